"""Block metadata: the one definition of "which (query, key) pairs are allowed", and its lowering to
EMPTY / PARTIAL / FULL blocks. Used by the reference (dense), the XLA form, the Pallas kernels (as their
in-kernel predicate) and ring attention (per ring step).

A pair is allowed iff the mask allows it, the key is valid (``kv_pos >= 0``: not padding, not an empty
cache slot) and, with packed documents, both tokens are in the same segment (FAMILIES.md §2.1).
Lengths are padded to block multiples by :func:`pad_coordinates`: padded queries repeat the last
query's coordinates (their rows are dropped), padded keys get position −1 (never allowed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks
from seqmix.ops.masks import EMPTY, FULL, PARTIAL, Coords, Mask, Span

Array = Any


def pair_allowed(mask: Mask, q_pos, q_rel, q_seg, kv_pos, kv_rel, kv_seg) -> Array:
    """The mask AND valid key AND same segment, broadcasting ``q_*`` against ``kv_*`` (seg may be None)."""
    ok = mask.allowed(Coords(q_pos, q_rel), Coords(kv_pos, kv_rel)) & (kv_pos >= 0)
    if q_seg is not None:
        ok = ok & (q_seg == kv_seg)
    return ok


@dataclasses.dataclass(frozen=True)
class PairPredicate:
    """:func:`pair_allowed` for one static mask as a plain, hashable callable on int32 coordinate rows
    ``(q, kv) -> bool``, each a tuple ``(pos, rel, seg, ...)`` broadcasting against the other (the
    Pallas kernels' in-kernel predicate; the segments are ignored unless ``segments``)."""

    mask: Mask
    segments: bool

    def __call__(self, q, kv):
        (q_pos, q_rel, q_seg), (kv_pos, kv_rel, kv_seg) = q[:3], kv[:3]
        return pair_allowed(self.mask, q_pos, q_rel, q_seg if self.segments else None, kv_pos, kv_rel,
                            kv_seg if self.segments else None)


def full_allowed(mask: Mask, q_pos, kv_pos, q_rel, kv_rel, q_seg, kv_seg) -> Array:
    """Dense boolean ``[B, Tq, S]`` of allowed pairs (the reference's mask).

    q_pos ``[Tq]``, kv_pos ``[S]`` (negative = padding / empty cache slot), rel ``[B or 1, T]``,
    seg ``[B, T]`` or None.
    """
    seg_q = None if q_seg is None else q_seg[:, :, None]
    seg_k = None if kv_seg is None else kv_seg[:, None, :]
    return pair_allowed(mask, q_pos[None, :, None], q_rel[:, :, None], seg_q, kv_pos[None, None, :],
                        kv_rel[:, None, :], seg_k)


def count_allowed(call, rows: int = 512) -> int:
    """The number of allowed (query, key) pairs of a concrete AttentionCall, summed over the batch.

    Evaluates :func:`pair_allowed` ``rows`` queries at a time (``[B, rows, S]`` booleans), so it is
    exact for every mask and never holds ``[Tq, S]``."""
    coords = (call.q_pos, call.kv_pos, call.q_rel, call.kv_rel, call.q_seg, call.kv_seg)
    if not all(_checks.is_concrete(x) for x in coords if x is not None):
        raise ValueError("count_allowed needs concrete positions (call it outside jit)")
    b, tq = call.q.shape[:2]
    s = call.k.shape[1]
    q_rel = jnp.broadcast_to(call.q_rel, (b, tq))
    kv_rel = jnp.broadcast_to(call.kv_rel, (b, s))
    total = 0
    for lo in range(0, tq, rows):
        hi = min(lo + rows, tq)
        q_seg = None if call.q_seg is None else call.q_seg[:, lo:hi]
        ok = full_allowed(call.mask, call.q_pos[lo:hi], call.kv_pos, q_rel[:, lo:hi], kv_rel, q_seg, call.kv_seg)
        total += int(np.broadcast_to(np.asarray(ok), (b, hi - lo, s)).sum())
    return total


# ----------------------------------------------------------------------------- padding


def pad_to(x, axis: int, size: int, value=None):
    """Pad ``axis`` of ``x`` to ``size`` with ``value`` (None: repeat the edge)."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    if value is None:
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class PaddedCoords:
    """Coordinates padded to ``tp`` queries and ``sp`` keys: positions ``[Tp]`` / ``[Sp]``, rel and seg
    ``[B, Tp]`` / ``[B, Sp]`` (seg None without packed documents), ``q_valid [Tp]``."""

    q_pos: Array
    kv_pos: Array
    q_rel: Array
    kv_rel: Array
    q_seg: Array | None
    kv_seg: Array | None
    q_valid: Array


def pad_coordinates(call, tp: int, sp: int) -> PaddedCoords:
    """The call's (``q_pos``, ``kv_pos``, ``q_rel``, ``kv_rel``, ``q_seg``, ``kv_seg``) padded for blocking."""
    b, tq = call.q.shape[:2]
    s = call.k.shape[1]
    has_seg = call.q_seg is not None
    return PaddedCoords(
        q_pos=pad_to(call.q_pos, 0, tp), kv_pos=pad_to(call.kv_pos, 0, sp, -1),
        q_rel=pad_to(jnp.broadcast_to(call.q_rel, (b, tq)), 1, tp),
        kv_rel=pad_to(jnp.broadcast_to(call.kv_rel, (b, s)), 1, sp),
        q_seg=pad_to(call.q_seg, 1, tp) if has_seg else None,
        kv_seg=pad_to(call.kv_seg, 1, sp) if has_seg else None,
        q_valid=jnp.arange(tp) < tq)


# ----------------------------------------------------------------------------- classification


def _block_span(pos, rel, valid, block):
    """Per-block ranges. pos [T], rel [B, T], valid [T] -> pos_lo/hi [nb], rel_lo/hi [B, nb]."""
    big = jnp.iinfo(jnp.int32).max
    nb = pos.shape[0] // block
    p = pos.reshape(nb, block)
    v = valid.reshape(nb, block)
    r = rel.reshape(rel.shape[0], nb, block)
    vr = v[None]
    return Span(
        pos_lo=jnp.min(jnp.where(v, p, big), -1),
        pos_hi=jnp.max(jnp.where(v, p, -big), -1),
        rel_lo=jnp.min(jnp.where(vr, r, big), -1),
        rel_hi=jnp.max(jnp.where(vr, r, -big), -1),
    )


def _seg_range(seg, valid, block):
    big = jnp.iinfo(jnp.int32).max
    s = seg.reshape(seg.shape[0], -1, block)
    v = valid.reshape(1, -1, block)
    return jnp.min(jnp.where(v, s, big), -1), jnp.max(jnp.where(v, s, -big), -1)


def classify_blocks(mask: Mask, q_pos, kv_pos, q_rel, kv_rel, q_seg, kv_seg, q_valid, block_q,
                    block_kv) -> Array:
    """Block metadata: int32 ``[Tq/bq, S/bkv]`` with EMPTY, PARTIAL or FULL for every batch row.

    Lengths must already be padded to block multiples. ``q_valid`` ``[Tq]`` marks real queries;
    keys are valid where ``kv_pos >= 0``. A block is EMPTY only if it is empty in every batch row and
    FULL only if it is full in every row, so one table serves the whole batch. Sound for any mask
    whose ``bounds`` are (``any`` over-, ``all`` under-approximating).
    """
    kv_valid = kv_pos >= 0
    qs = _block_span(q_pos, q_rel, q_valid, block_q)
    ks = _block_span(kv_pos, kv_rel, kv_valid, block_kv)
    qspan = Span(qs.pos_lo[None, :, None], qs.pos_hi[None, :, None], qs.rel_lo[:, :, None], qs.rel_hi[:, :, None])
    kspan = Span(ks.pos_lo[None, None, :], ks.pos_hi[None, None, :], ks.rel_lo[:, None, :], ks.rel_hi[:, None, :])
    any_, all_ = mask.bounds(qspan, kspan)
    kv_any = kv_valid.reshape(-1, block_kv).any(-1)[None, None, :]
    kv_all = kv_valid.reshape(-1, block_kv).all(-1)[None, None, :]
    q_any = q_valid.reshape(-1, block_q).any(-1)[None, :, None]
    any_ = any_ & kv_any & q_any
    all_ = all_ & kv_all
    if q_seg is not None:
        qlo, qhi = _seg_range(q_seg, q_valid, block_q)
        klo, khi = _seg_range(kv_seg, kv_valid, block_kv)
        qlo, qhi = qlo[:, :, None], qhi[:, :, None]
        klo, khi = klo[:, None, :], khi[:, None, :]
        any_ = any_ & (qlo <= khi) & (klo <= qhi)
        all_ = all_ & (qlo == qhi) & (klo == khi) & (qlo == klo)
    cls = jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY))
    # One table for the batch: empty only if empty everywhere, full only if full everywhere.
    return jnp.where(jnp.all(cls == FULL, 0), FULL, jnp.where(jnp.all(cls == EMPTY, 0), EMPTY, PARTIAL)).astype(jnp.int32)


def classify_padded(mask: Mask, c: PaddedCoords, block_q: int, block_kv: int) -> Array:
    """:func:`classify_blocks` on padded coordinates."""
    return classify_blocks(mask, c.q_pos, c.kv_pos, c.q_rel, c.kv_rel, c.q_seg, c.kv_seg, c.q_valid,
                           block_q, block_kv)
