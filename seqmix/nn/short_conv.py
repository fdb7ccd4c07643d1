"""``ShortConv``: a causal depthwise convolution over time (width 4 by default) with segment resets.

Used in front of the recurrent ops (DeltaNet / Gated DeltaNet q, k, v; Based), FAMILIES.md §2.7::

    y_t[c] = act( Σ_{j=0}^{W-1} w[j, c] · x_{t-j}[c] · [no segment change in (t-j, t]]  (+ b[c]) )

Tap ``j`` reads ``x_{t-j}`` only if the segment did not change between ``t - j`` and ``t`` (the same
reset rule as the recurrent ops: a reset at every ``t`` with ``seg[t] != seg[t-1]``), so a packed row
equals one call per document. Inputs before the first token are zeros.

Decoding: ``cache = conv.init_cache(B)`` holds the last ``W - 1`` inputs and their segment ids
(:class:`ConvCache`); ``y, cache = conv.decode(x [B, T_new, C], cache, segment_ids=)`` equals the
parallel form's rows for these tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = Any

_ACTIVATIONS = {None: lambda x: x, "identity": lambda x: x, "silu": jax.nn.silu}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "seg"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ConvCache:
    """The last ``W - 1`` inputs ``x [B, W-1, C]`` (compute dtype) and their segment ids ``seg [B, W-1]``
    (int32; ``-1`` = before the stream's first token). A pytree."""

    x: Array
    seg: Array


def _check_int(owner: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}; got {value!r}")
    return value


def causal_conv(x, weight, *, bias=None, segment_ids=None, history=None, history_seg=None):
    """Functional form: depthwise causal conv of ``x [B, T, C]`` with ``weight [W, C]`` (tap j reads
    ``x_{t-j}``) and optional ``bias [C]``.

    ``segment_ids [B, T]`` (int) stops taps at segment changes; ``history [B, W-1, C]`` / ``history_seg
    [B, W-1]`` are the inputs before ``x`` (zeros / no segment if None). Accumulates in fp32; returns
    fp32 ``[B, T, C]`` (no activation).
    """
    b, t, c = x.shape
    w = weight.shape[0]
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if history is None:
        history = jnp.zeros((b, w - 1, c), x.dtype)
    if history_seg is None:
        history_seg = jnp.broadcast_to(seg[:, :1], (b, w - 1))  # zeros history: its ids do not matter
    xe = jnp.concatenate([history.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # [B, W-1+T, C]
    se = jnp.concatenate([jnp.asarray(history_seg, jnp.int32), seg], axis=1)  # [B, W-1+T]
    wf = weight.astype(jnp.float32)
    # same[:, i] is True where token i of the extended row continues the segment of token i - 1.
    same = se[:, 1:] == se[:, :-1]  # [B, W-2+T]
    y = xe[:, w - 1:] * wf[0]
    ok = jnp.ones((b, t), bool)
    for j in range(1, w):
        # tap j for output t (extended index t + w - 1) needs no change at extended indices t+w-1 .. t+w-j
        ok = ok & same[:, w - 1 - j: w - 1 - j + t]
        y = y + jnp.where(ok[..., None], xe[:, w - 1 - j: w - 1 - j + t], 0.0) * wf[j]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


class ShortConv(nnx.Module):
    """Causal depthwise convolution of width ``kernel_size`` over ``[B, T, channels]``, optional SiLU.

    Args:
      channels: number of channels ``C`` (each has its own filter).
      kernel_size: filter width ``W`` (default 4).
      activation: ``"silu"`` (default), ``"identity"`` or None.
      use_bias: a bias per channel.
      dtype: output dtype (None = the input's); param_dtype: dtype of ``weight [W, C]`` (tap j multiplies
        ``x_{t-j}``; init uniform(±1/√W), PyTorch's Conv1d default) and ``bias [C]``.

    ``__call__(x [B, T, C], *, segment_ids=None) -> [B, T, C]``;
    ``init_cache(batch) -> ConvCache``; ``decode(x [B, T_new, C], cache, *, segment_ids=None) -> (y, cache)``.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: str | None = "silu",
                 use_bias: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.channels = _check_int("ShortConv", "channels", channels)
        self.kernel_size = _check_int("ShortConv", "kernel_size", kernel_size)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ShortConv: activation must be one of {[a for a in _ACTIVATIONS if a]} or None; "
                             f"got {activation!r}")
        self.activation = activation
        self.dtype = dtype
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels), param_dtype,
                                                   -bound, bound))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None

    def _check_x(self, x, where: str):
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != self.channels:
            raise ValueError(f"ShortConv.{where}: x must have shape [batch, seq, {self.channels}]; got "
                             f"{list(jnp.shape(x))}")

    def _finish(self, y, x):
        return _ACTIVATIONS[self.activation](y).astype(self.dtype or x.dtype)

    def _bias(self):
        return None if self.bias is None else self.bias[...]

    def __call__(self, x, *, segment_ids=None):
        """``x [B, T, C]``, ``segment_ids [B, T]`` int or None -> ``[B, T, C]``."""
        self._check_x(x, "__call__")
        y = causal_conv(x, self.weight[...], bias=self._bias(), segment_ids=segment_ids)
        return self._finish(y, x)

    def init_cache(self, batch: int, dtype=None) -> ConvCache:
        """An empty cache: ``W - 1`` zero inputs with segment id ``-1``."""
        batch = _check_int("ShortConv.init_cache", "batch", batch)
        dtype = dtype or self.dtype or jnp.float32
        return ConvCache(x=jnp.zeros((batch, self.kernel_size - 1, self.channels), dtype),
                         seg=jnp.full((batch, self.kernel_size - 1), -1, jnp.int32))

    def decode(self, x, cache: ConvCache, *, segment_ids=None):
        """Feed ``x [B, T_new, C]`` after the cached inputs; returns ``(y [B, T_new, C], cache)``.
        ``segment_ids`` ``[B, T_new]`` (None = segment 0, as in ``Attention.decode``)."""
        self._check_x(x, "decode")
        if not isinstance(cache, ConvCache):
            raise ValueError(f"ShortConv.decode: cache must be a ConvCache (from init_cache); got "
                             f"{type(cache).__name__}")
        b, t, _ = x.shape
        seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        y = causal_conv(x, self.weight[...], bias=self._bias(), segment_ids=seg, history=cache.x,
                        history_seg=cache.seg)
        w1 = self.kernel_size - 1
        if w1:
            xs = jnp.concatenate([cache.x, x.astype(cache.x.dtype)], axis=1)[:, -w1:]
            ss = jnp.concatenate([cache.seg, seg], axis=1)[:, -w1:]
            cache = ConvCache(x=xs, seg=ss)
        return self._finish(y, x), cache


def check_short_conv(owner: str, value) -> int | None:
    """A layer's ``short_conv`` argument: None (or 0) = no convolution, else the filter width (int >= 1)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    return _check_int(owner, "short_conv", value)


class QKVConvs(nnx.Module):
    """One :class:`ShortConv` each on the q, k and v projections (the Zoology / Based / fla recipe).

    Args: ``channels`` ``(Cq, Ck, Cv)`` (the projections' widths, heads × head dim), ``kernel_size``,
    ``activation`` (``"silu"`` or None), dtype, param_dtype, rngs.

    ``__call__(q [B, T, Cq], k [B, T, Ck], v [B, T, Cv], *, segment_ids=None, caches=None) -> (q, k, v,
    caches)``: the parallel form when ``caches`` is None (and returns None for them), else decoding after
    the cached inputs (``caches`` from :meth:`init_cache`, returned updated).
    """

    def __init__(self, channels: tuple[int, int, int], kernel_size: int, *, activation: str | None = "silu",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(activation=activation, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cq, ck, cv = channels
        self.kernel_size = kernel_size
        self.q, self.k, self.v = (ShortConv(c, kernel_size, **kw) for c in (cq, ck, cv))

    def __call__(self, q, k, v, *, segment_ids=None, caches=None):
        convs = (self.q, self.k, self.v)
        if caches is None:
            return tuple(conv(x, segment_ids=segment_ids) for conv, x in zip(convs, (q, k, v))) + (None,)
        if len(caches) != 3:
            raise ValueError(f"QKVConvs: caches must hold 3 ConvCaches (q, k, v); got {len(caches)}")
        out = [conv.decode(x, c, segment_ids=segment_ids) for conv, x, c in zip(convs, (q, k, v), caches)]
        return tuple(y for y, _ in out) + (tuple(c for _, c in out),)

    def init_cache(self, batch: int, dtype=None) -> tuple[ConvCache, ConvCache, ConvCache]:
        """Empty caches for the three convolutions."""
        return tuple(conv.init_cache(batch, dtype) for conv in (self.q, self.k, self.v))
