"""Neighborhood attention (NATTEN semantics) as a :class:`~seqmix.ops.masks.Mask` over flattened tokens.

A ``[B, X, H, D]`` / ``[B, X, Y, H, D]`` / ``[B, X, Y, Z, H, D]`` input is attended as ``T = X·Y·Z``
row-major tokens; :class:`Neighborhood` decides each (query, key) pair from their grid coordinates with the
AND over dimensions of the 1-D rule of FAMILIES.md §2.2 (kernel ``k``, dilation ``d``, stride ``s``, causal):

1. Dilation groups: only ``x_q mod d == x_kv mod d``; then group coordinates ``x // d`` and group length
   ``L_g = L // d + (1 if x mod d < L mod d else 0)``.
2. Non-causal: ``wl = k // 2``, ``wr = k // 2 + k % 2 − 1``; stride-group leader
   ``ℓ = min((x_q // s)·s + s // 2, L_g − 1)``; centre ``c = clamp(ℓ, wl, L_g − 1 − wr)``; allowed iff
   ``c − wl ≤ x_kv ≤ c + wr``. Windows are shifted at the borders, never truncated.
3. Causal: ``ℓ = min((x_q // s)·s + s − 1, L_g − 1)``; allowed iff ``x_kv ≤ x_q`` and ``ℓ − x_kv < k``.

Block bounds (for skipping empty blocks in every attention implementation) use the box of grid coordinates
a block of flattened positions covers and the window's monotone ends, so ``any`` over- and ``all``
under-approximates as :mod:`seqmix.ops.masks` requires; with dilation > 1 no block is called full.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from seqmix.ops.masks import Mask


def per_dim(name: str, value, ndim: int, kind=int) -> tuple:
    """An int (bool for ``kind=bool``) or a length-``ndim`` tuple of them, as a tuple (ValueError otherwise)."""
    def ok(v):
        return isinstance(v, (bool, np.bool_)) if kind is bool else (
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)))

    if ok(value):
        return (kind(value),) * ndim
    if isinstance(value, (tuple, list)) and len(value) == ndim and all(ok(v) for v in value):
        return tuple(kind(v) for v in value)
    what = "a bool" if kind is bool else "an int"
    raise ValueError(f"neighborhood attention: {name} must be {what} or a tuple of {ndim} (one per spatial "
                     f"dimension); got {value!r}")


@dataclasses.dataclass(frozen=True)
class Neighborhood(Mask):
    """NATTEN's neighborhood rule on a row-major grid of ``shape`` (tokens ``0 .. prod(shape) − 1``).

    Every field is one int per spatial dimension (use :func:`neighborhood` to broadcast ints).
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    is_causal: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.shape)
        if n not in (1, 2, 3):
            raise ValueError(f"neighborhood attention is 1-D, 2-D or 3-D; got a {n}-D grid {self.shape}")
        for name in ("kernel_size", "dilation", "stride", "is_causal"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"neighborhood attention: {name} needs {n} entries; got {getattr(self, name)}")
        for i, (size, k, d, s) in enumerate(zip(self.shape, self.kernel_size, self.dilation, self.stride)):
            where = f"dimension {i} (size {size})"
            if min(size, k, d, s) < 1:
                raise ValueError(f"neighborhood attention: {where}: size, kernel_size, dilation and stride must be "
                                 f">= 1; got kernel_size={k}, dilation={d}, stride={s}")
            if k * d > size:
                raise ValueError(f"neighborhood attention: {where}: kernel_size × dilation = {k} × {d} = {k * d} "
                                 f"exceeds the size")
            if s > k:
                raise ValueError(f"neighborhood attention: {where}: stride {s} exceeds kernel_size {k}")

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    def _dims(self):
        place = [math.prod(self.shape[i + 1:]) for i in range(len(self.shape))]
        return zip(self.shape, place, self.kernel_size, self.dilation, self.stride, self.is_causal)

    def check_positions(self, q_pos_max, kv_pos_max):
        if max(q_pos_max, kv_pos_max) >= self.tokens:
            raise ValueError(f"neighborhood mask over a grid of {self.tokens} tokens {self.shape} does not cover "
                             f"positions up to {max(q_pos_max, kv_pos_max)}")

    def allowed(self, q, kv):
        ok = (q.pos >= 0) & (q.pos < self.tokens) & (kv.pos < self.tokens)
        for size, place, k, d, s, causal in self._dims():
            xq, xk = (q.pos // place) % size, (kv.pos // place) % size
            ok = ok & _rule(xq, xk, size, k, d, s, causal)
        return ok

    def bounds(self, q, kv):
        last = self.tokens - 1
        qlo, qhi = jnp.clip(q.pos_lo, 0, last), jnp.clip(q.pos_hi, 0, last)
        klo, khi = jnp.clip(kv.pos_lo, 0, last), jnp.clip(kv.pos_hi, 0, last)
        any_ = all_ = True
        parent = None
        for size, place, k, d, s, causal in self._dims():
            qa, qb = _coordinate_range(qlo, qhi, size, place, parent)
            ka, kb = _coordinate_range(klo, khi, size, place, parent)
            parent = place
            lo_groups, hi_groups = size // d, size // d + (1 if size % d else 0)
            start_min = _window(qa // d, lo_groups, k, s, causal)[0]
            end_max = _window(qb // d, hi_groups, k, s, causal)[1]
            any_ = any_ & (ka <= d * end_max + d - 1) & (kb >= d * start_min)
            if d == 1:  # every query's window contains [start(qb), end(qa)]
                all_ = all_ & (ka >= _window(qb, size, k, s, causal)[0]) & (kb <= _window(qa, size, k, s, causal)[1])
            else:  # pairs of different residues never match, and a block holds several
                all_ = False
        shape = jnp.broadcast_shapes(jnp.shape(q.pos_lo), jnp.shape(kv.pos_lo))
        return jnp.broadcast_to(any_, shape), jnp.broadcast_to(all_, shape)

    def cache_extent(self):
        # Causal along the first axis (time, for video) with stride 1: a query sees frames back to
        # (K − 1)·D before its own, so decoding a frame at a time needs that many frames plus its own.
        if self.is_causal[0] and self.stride[0] == 1:
            frame = int(np.prod(self.shape[1:], dtype=np.int64))
            return ((self.kernel_size[0] - 1) * self.dilation[0] + 1) * frame, 0
        return None, 0


@dataclasses.dataclass(frozen=True)
class CausalNeighborhood(Mask):
    """The 1-D causal neighborhood (stride 1) on relative positions: key ``j`` for query ``i`` iff
    ``i − j ∈ {0, d, 2d, …, (k − 1)·d}``.

    Equal to ``neighborhood((T,), k, d, is_causal=True)`` for every ``T`` (the causal window ends at the query
    and is truncated, not shifted, at the start), but bound to no grid size: for language models (the ``na``
    mixer), packed documents (it reads only ``i − j``, so windows never reach into another segment's
    residues) and decoding (``cache_extent``: the last ``(k − 1)·d + 1`` keys).
    """

    kernel_size: int
    dilation: int = 1

    def __post_init__(self):
        for name in ("kernel_size", "dilation"):
            val = getattr(self, name)
            if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"CausalNeighborhood: {name} must be an int >= 1; got {val!r}")

    @property
    def span(self) -> int:
        """Keys from the oldest allowed one to the query itself, inclusive."""
        return (self.kernel_size - 1) * self.dilation + 1

    def allowed(self, q, kv):
        back = q.pos - kv.pos
        return (back >= 0) & (back < self.span) & (back % self.dilation == 0)

    def bounds(self, q, kv):
        back_min = q.pos_lo - kv.pos_hi  # smallest i − j in the block
        back_max = q.pos_hi - kv.pos_lo
        any_ = (back_max >= 0) & (back_min < self.span)
        all_ = (back_min >= 0) & (back_max < self.span) & (self.dilation == 1)
        shape = jnp.broadcast_shapes(jnp.shape(q.pos_lo), jnp.shape(kv.pos_lo))
        return jnp.broadcast_to(any_, shape), jnp.broadcast_to(all_, shape)

    def cache_extent(self):
        return self.span, 0


def _rule(xq, xk, size: int, k: int, d: int, s: int, causal: bool):
    """The 1-D rule on grid coordinates (int arrays that broadcast)."""
    same_group = (xq % d) == (xk % d)
    gq, gk = xq // d, xk // d
    groups = size // d + ((xq % d) < (size % d)).astype(jnp.int32)
    start, end = _window(gq, groups, k, s, causal)
    return same_group & (gk >= start) & (gk <= end)


def _window(g, groups, k: int, s: int, causal: bool):
    """(first, last) allowed key group coordinate of query group coordinate ``g`` (both non-decreasing in ``g``
    and in the group length ``groups``)."""
    if causal:
        leader = jnp.minimum((g // s) * s + s - 1, groups - 1)
        return leader - k + 1, g
    wl, wr = k // 2, k // 2 + k % 2 - 1
    leader = jnp.minimum((g // s) * s + s // 2, groups - 1)
    centre = jnp.clip(leader, wl, groups - 1 - wr)
    return centre - wl, centre + wr


def _coordinate_range(lo, hi, size: int, place: int, parent: int | None):
    """The range of one grid coordinate over flattened positions ``lo .. hi``: exact inside one row of the
    enclosing dimension, the whole dimension otherwise."""
    a, b = (lo // place) % size, (hi // place) % size
    if parent is None:
        return a, b
    one_row = (lo // parent) == (hi // parent)
    return jnp.where(one_row, a, 0), jnp.where(one_row, b, size - 1)


def neighborhood(shape, kernel_size, dilation=1, stride=1, is_causal=False) -> Neighborhood:
    """:class:`Neighborhood` with every option given as an int (all dimensions) or a per-dimension tuple."""
    shape = tuple(int(x) for x in shape)
    n = len(shape)
    return Neighborhood(shape, per_dim("kernel_size", kernel_size, n), per_dim("dilation", dilation, n),
                        per_dim("stride", stride, n), per_dim("is_causal", is_causal, n, bool))
