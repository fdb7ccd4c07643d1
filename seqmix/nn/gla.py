"""``GatedLinearAttention`` (per-channel low-rank gate) and ``SimpleGLA`` (Mamba-2 scalar gate).

Mixers: ``gla``, ``simple_gla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.nn._recurrent_layer import GatedOutput, RecurrentLayer, mamba_decay_params, mamba_gate, positive_int
from seqmix.nn.mixer import no_arg, register_mixer


class GatedLinearAttention(RecurrentLayer):
    """Gated Linear Attention (2312.06635; FAMILIES.md §2.6): a per-channel data-dependent decay.

    ``log α_t = logsigmoid(x_t W_1 W_2 + b) / τ`` per head and key channel (``W_1: d × r``,
    ``W_2: r × H·Dk``, r = ``gate_low_rank``, τ = ``gate_logit_normalizer``);
    ``S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_r))``.

    Args: d_model, num_heads, gate_low_rank (16), gate_logit_normalizer (16), head_dim (``Dv``, default
    ``d_model // num_heads``), key_dim (``Dk``, default head_dim), short_conv (width of the causal conv +
    SiLU on q, k, v; None = none), use_bias, chunk_size, dtype, param_dtype, impl, rngs.
    """

    _family = "gla"

    def __init__(self, d_model: int, num_heads: int, *, gate_low_rank: int = 16,
                 gate_logit_normalizer: float = 16.0, head_dim: int | None = None, key_dim: int | None = None,
                 short_conv: int | None = None, use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl=None, sequence_parallel=None,
                 rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        gate_low_rank = positive_int("GatedLinearAttention", "gate_low_rank", gate_low_rank)
        if (isinstance(gate_logit_normalizer, bool) or not isinstance(gate_logit_normalizer, (int, float))
                or not gate_logit_normalizer > 0):
            raise ValueError(f"GatedLinearAttention: gate_logit_normalizer must be a positive number; got "
                             f"{gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        self._init_qkv(d_model, short_conv=short_conv, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        self.gk_down = nnx.Linear(d_model, gate_low_rank, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.gk_up = nnx.Linear(gate_low_rank, h * dk, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.out = GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, conv_caches = self._qkv(x, segment_ids, conv_caches)
        logits = self._heads(self.gk_up(self.gk_down(x)), self.key_dim).astype(jnp.float32)
        g = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        return q, k, v, {"g": g}, conv_caches

    def _output(self, o, x):
        return self.out(o, x)


class SimpleGLA(RecurrentLayer):
    """Simple GLA with a Mamba-2 style scalar gate per head and token (FAMILIES.md §2.6).

    ``g_t = −exp(A_log)·softplus(x_t W_a + dt_bias)`` (``[B, T, H]``, Mamba-2 init of ``A_log`` and
    ``dt_bias``); ``S_t = exp(g_t) S_{t−1} + k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_g))``.

    Args: d_model, num_heads, head_dim (``Dv``), key_dim (``Dk``, default head_dim), short_conv (width of
    the causal conv + SiLU on q, k, v; None = none), use_bias, chunk_size, dtype, param_dtype, impl, rngs.
    """

    _family = "simple_gla"

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None, key_dim: int | None = None,
                 short_conv: int | None = None, use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl=None, sequence_parallel=None, rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        h, dv = self.num_heads, self.head_dim
        self._init_qkv(d_model, short_conv=short_conv, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        self.a_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.A_log, self.dt_bias = mamba_decay_params(rngs, h, param_dtype)
        self.out = GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, conv_caches = self._qkv(x, segment_ids, conv_caches)
        g = mamba_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return q, k, v, {"g": g}, conv_caches

    def _output(self, o, x):
        return self.out(o, x)


def gla_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return GatedLinearAttention(dims.d_model, dims.num_heads, **dims.layer_kwargs(sequence_parallel), rngs=rngs)


def simple_gla_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return SimpleGLA(dims.d_model, dims.num_heads, **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("gla", gla_mixer, check_arg=no_arg, doc="Gated Linear Attention (low-rank per-channel gate)")
register_mixer("simple_gla", simple_gla_mixer, check_arg=no_arg, doc="simple GLA (Mamba-2 style scalar gate per head)")
