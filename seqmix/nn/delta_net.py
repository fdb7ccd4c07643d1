"""``DeltaNet`` and ``GatedDeltaNet``: delta-rule layers with short convs and L2-normalized q/k.

Mixers: ``deltanet``, ``gdn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.nn._recurrent_layer import GatedOutput, RecurrentLayer, l2norm, mamba_decay_params, mamba_gate
from seqmix.nn.mixer import no_arg, register_mixer


class DeltaNet(RecurrentLayer):
    """DeltaNet layer (2406.06484; FAMILIES.md §2.7).

    q, k, v projections → short causal depthwise conv (width ``short_conv``, 4; None = none) + SiLU → q, k
    L2-normalized per head; ``β = σ(x W_b)`` per head (``2σ`` with ``allow_neg_eigval``);
    ``S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_g))``.
    The convolutions reset at segment starts (no taps across packed documents).

    Args: d_model, num_heads, short_conv (4), allow_neg_eigval (False), head_dim (``Dv``), key_dim
    (``Dk``, default head_dim), use_bias, chunk_size, dtype, param_dtype, impl, rngs.
    """

    _family = "delta_rule"
    _gated = False

    def __init__(self, d_model: int, num_heads: int, *, short_conv: int | None = 4, allow_neg_eigval: bool = False,
                 head_dim: int | None = None, key_dim: int | None = None, use_bias: bool = False,
                 chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32, impl=None,
                 sequence_parallel=None, rngs: nnx.Rngs):
        name = type(self).__name__
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        if not isinstance(allow_neg_eigval, bool):
            raise ValueError(f"{name}: allow_neg_eigval must be a bool; got {allow_neg_eigval!r}")
        self.allow_neg_eigval = allow_neg_eigval
        self._init_qkv(d_model, short_conv=short_conv, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        h, dv = self.num_heads, self.head_dim
        self.b_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self._gated:
            self.a_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.A_log, self.dt_bias = mamba_decay_params(rngs, h, param_dtype)
        self.out = GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, caches = self._qkv(x, segment_ids, conv_caches)
        q, k = l2norm(q), l2norm(k)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        per_token = {"beta": beta}
        if self._gated:
            per_token["g"] = mamba_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return q, k, v, per_token, caches

    def _output(self, o, x):
        return self.out(o, x)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer (2412.06464; FAMILIES.md §2.7): DeltaNet plus a Mamba-2 style decay
    ``g_t = −exp(A_log)·softplus(x_t W_a + dt_bias)`` per head:
    ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``. Arguments as :class:`DeltaNet`."""

    _family = "gated_delta_rule"
    _gated = True


def deltanet_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return DeltaNet(dims.d_model, dims.num_heads, **dims.layer_kwargs(sequence_parallel), rngs=rngs)


def gdn_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return GatedDeltaNet(dims.d_model, dims.num_heads, **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("deltanet", deltanet_mixer, check_arg=no_arg, doc="DeltaNet (delta rule, short convs, L2-normalized q/k)")
register_mixer("gdn", gdn_mixer, check_arg=no_arg, doc="Gated DeltaNet (gated delta rule, short convs, L2-normalized q/k)")
