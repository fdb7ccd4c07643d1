"""``Retention``: RetNet's multi-scale retention layer. Mixer: ``retnet``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqmix.nn._recurrent_layer import GatedOutput, RecurrentLayer
from seqmix.nn.mixer import no_arg, register_mixer
from seqmix.nn.rope import apply_rope
from seqmix.ops.retention import retnet_decay


class Retention(RecurrentLayer):
    """RetNet's multi-scale retention (2307.08621; FAMILIES.md §2.5).

    q, k, v projections; RoPE on q and k (plain rotary in place of xPos); ``S_t = γ_h S_{t−1} + k_t v_tᵀ``
    with the fixed per-head decay ``log γ_h = log(1 − 2^{−5−h})``; per-head RMSNorm of ``o`` (RetNet's
    GroupNorm without mean subtraction) times ``swish(x W_g)``; ``W_o``.

    Args: d_model, num_heads, head_dim (default ``d_model // num_heads``; even, for RoPE), rope_theta,
    short_conv (width of the causal conv + SiLU on q, k, v, before RoPE; None = none), use_bias, chunk_size,
    dtype, param_dtype, impl, rngs.
    """

    _family = "retention"

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None, rope_theta: float = 10000.0,
                 short_conv: int | None = None, use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl=None, sequence_parallel=None,
                 rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, None, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        if self.head_dim % 2:
            raise ValueError(f"Retention: RoPE needs an even head_dim; got head_dim={self.head_dim}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
            raise ValueError(f"Retention: rope_theta must be > 0; got {rope_theta!r}")
        self.rope_theta = float(rope_theta)
        h, d = self.num_heads, self.head_dim
        self._init_qkv(d_model, short_conv=short_conv, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        self.out = GatedOutput(d_model, h, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, conv_caches = self._qkv(x, segment_ids, conv_caches)
        q = apply_rope(q, positions, theta=self.rope_theta)
        k = apply_rope(k, positions, theta=self.rope_theta)
        return q, k, v, {}, conv_caches

    def _static(self):
        return dict(decay=retnet_decay(self.num_heads))

    def _output(self, o, x):
        return self.out(o, x)


def retnet_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return Retention(dims.d_model, dims.num_heads, rope_theta=dims.rope_theta, **dims.layer_kwargs(sequence_parallel),
                     rngs=rngs)


register_mixer("retnet", retnet_mixer, check_arg=no_arg, doc="RetNet retention (fixed per-head decay, RoPE, gated output)")
