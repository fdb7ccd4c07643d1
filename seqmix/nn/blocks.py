"""Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqmix.nn.mlp import SwiGLU
from seqmix.nn.norm import RMSNorm


class Block(nnx.Module):
    """One layer: a sequence mixer and a SwiGLU MLP, each behind an RMSNorm and a residual.

    Args:
      mixer: a module following the mixer protocol (``seqmix.models.mixers``):
        ``mixer(x, positions=, segment_ids=)``, ``mixer.init_cache(batch, max_len)``,
        ``mixer.decode(x, cache, segment_ids=) -> (y, cache)``.
      d_model: residual width; mlp_hidden: SwiGLU hidden width.
      dtype: compute dtype; param_dtype: parameter dtype.

    ``__call__(x [B, T, d_model], *, positions=None, segment_ids=None) -> [B, T, d_model]``;
    ``decode(x [B, T_new, d_model], cache, *, segment_ids=None) -> (y, cache)``.
    """

    def __init__(self, mixer: nnx.Module, d_model: int, mlp_hidden: int, *, norm_eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.mixer_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = SwiGLU(d_model, mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None):
        x = x + self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def init_cache(self, batch: int, max_len: int):
        return self.mixer.init_cache(batch, max_len)

    def decode(self, x, cache, *, segment_ids=None):
        h, cache = self.mixer.decode(self.mixer_norm(x), cache, segment_ids=segment_ids)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache
