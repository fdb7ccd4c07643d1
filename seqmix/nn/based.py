"""``Based``: global Taylor linear attention plus sliding-window softmax attention. Mixer: ``based[:W]``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.nn._recurrent_layer import RecurrentLayer, positive_int, resolve_head_dim
from seqmix.nn.attention import Attention
from seqmix.nn.mixer import optional_int_arg, register_mixer
from seqmix.nn.recurrent_cache import RecurrentCache
from seqmix.ops import masks as masks_lib
from seqmix.ops.kv_cache import KVCache
from seqmix.ops.linear_attention import feature_dim as _feature_dim


@functools.partial(jax.tree_util.register_dataclass, data_fields=["linear", "window"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BasedCache:
    """Based's decode cache: the Taylor branch's :class:`RecurrentCache` and the window's ``KVCache``."""

    linear: RecurrentCache
    window: KVCache


class _TaylorBranch(RecurrentLayer):
    """Based's global branch: q, k ``[B, T, H, feature_dim]``, v ``[B, T, H, Dv]``, each through a short
    causal conv (no activation); normalized Taylor linear attention; ``W_o``."""

    _family = "linear_attention"

    def __init__(self, d_model, num_heads, *, feature_dim, head_dim, short_conv, eps, chunk_size, dtype,
                 param_dtype, impl, sequence_parallel=None, rngs):
        self._common_init(d_model, num_heads, head_dim, feature_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        self.eps = eps
        self._init_qkv(d_model, short_conv=short_conv, conv_activation=None, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        h, dv = self.num_heads, self.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Linear(h * dv, d_model, **kw)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, caches = self._qkv(x, segment_ids, conv_caches)
        return q, k, v, {}, caches

    def _static(self):
        return dict(feature_map="taylor", normalize=True, eps=self.eps)

    def _state_dims(self):
        return _feature_dim("taylor", self.key_dim), self.head_dim + 1

    def _output(self, o, x):
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))


class Based(nnx.Module):
    """Based (2402.18668; FAMILIES.md §2.4): global Taylor linear attention plus local softmax attention.

    ``y = W_o(TaylorLinearAttention(conv(x W_q), conv(x W_k), conv(x W_v))) + SlidingWindowAttention(x)``:

    * global branch: q, k projected to ``feature_dim`` (16) per head, v to ``head_dim``, each through a
      short causal depthwise conv (width ``short_conv``, no activation; reset at segment starts); the
      2nd-order Taylor map ``φ(q)·φ(k) = 1 + s + s²/2`` (feature dim ``1 + d + d(d+1)/2`` = 153) with
      the normalizer (``eps`` 1e-6; the denominator is positive);
    * local branch: :class:`~seqmix.nn.Attention` with ``mask=LocalWindow(window)`` and RoPE (its own
      q/k/v/o projections);
    * the two branch outputs are summed.

    Args: d_model, num_heads, feature_dim (16), window (64), short_conv (4; None = no convs), head_dim (``Dv``, default
    ``d_model // num_heads``; even, for RoPE), eps, rope_theta, chunk_size, dtype, param_dtype, impl (the
    linear op's), sequence_parallel (both branches: LASP for the Taylor branch, the softmax strategy for the
    window), rngs.

    Decoding: :class:`BasedCache` (a recurrent state of ``[B, H, 153, Dv + 1]`` and a ring of ``window``
    keys).
    """

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, window: int = 64,
                 short_conv: int | None = 4, head_dim: int | None = None, eps: float = 1e-6, rope_theta: float = 10000.0,
                 chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32, impl=None,
                 sequence_parallel=None, rngs: nnx.Rngs):
        d_model = positive_int("Based", "d_model", d_model)
        num_heads = positive_int("Based", "num_heads", num_heads)
        head_dim = resolve_head_dim("Based", d_model, num_heads, head_dim)
        feature_dim = positive_int("Based", "feature_dim", feature_dim)
        window = positive_int("Based", "window", window)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"Based: eps must be a positive number; got {eps!r}")
        if head_dim % 2:
            raise ValueError(f"Based: the window attention's RoPE needs an even head_dim; got head_dim={head_dim}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.feature_dim, self.window = feature_dim, window
        self.linear = _TaylorBranch(d_model, num_heads, feature_dim=feature_dim, head_dim=head_dim,
                                    short_conv=short_conv, eps=float(eps), chunk_size=chunk_size, dtype=dtype,
                                    param_dtype=param_dtype, impl=impl, sequence_parallel=sequence_parallel,
                                    rngs=rngs)
        self.window_attn = Attention(d_model, num_heads, head_dim=head_dim, mask=masks_lib.LocalWindow(window),
                                     rope=True, rope_theta=rope_theta, dtype=dtype, param_dtype=param_dtype,
                                     sequence_parallel=sequence_parallel, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x ``[B, T, d_model]``; positions int ``[T]``; segment_ids int ``[B, T]`` or None -> ``[B, T, d_model]``."""
        x = self.linear._check_x(x)
        return (self.linear(x, positions=positions, segment_ids=segment_ids)
                + self.window_attn(x, positions=positions, segment_ids=segment_ids))

    def init_cache(self, batch: int, max_len: int) -> BasedCache:
        """The Taylor branch's recurrent cache and the window attention's ring KV cache."""
        return BasedCache(linear=self.linear.init_cache(batch, max_len),
                          window=self.window_attn.init_cache(batch, max_len))

    def decode(self, x, cache: BasedCache, *, segment_ids=None):
        """Feed ``x [B, T_new, d_model]``; returns ``(y [B, T_new, d_model], cache)``."""
        if not isinstance(cache, BasedCache):
            raise ValueError(f"Based.decode: cache must be a BasedCache (from init_cache); got {type(cache).__name__}")
        y1, lin = self.linear.decode(x, cache.linear, segment_ids=segment_ids)
        y2, win = self.window_attn.decode(x, cache.window, segment_ids=segment_ids)
        return y1 + y2, BasedCache(linear=lin, window=win)


def based_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return Based(dims.d_model, dims.num_heads, window=int(arg) if arg else 64, rope_theta=dims.rope_theta,
                 **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("based", based_mixer, check_arg=optional_int_arg,
               doc="Based: Taylor linear attention + sliding-window softmax (based:W, default W = 64) + short convs")
