"""Helpers shared by the sequence-parallel strategies: local shard metadata, global relative positions."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from seqmix.ops import masks as masks_lib

Array = Any

# Masks whose predicate ignores ``rel`` (positions inside segments). Any other mask (Sinks, PrefixLM,
# user-defined ones) is assumed to read it, so the strategies give it exact global relative positions.
_REL_FREE = (masks_lib.Full, masks_lib.SlidingWindow, masks_lib.ChunkedCausal, masks_lib.Explicit)


def mask_uses_rel(mask: masks_lib.Mask) -> bool:
    """Whether ``mask`` may read segment-relative positions (conservative: unknown kinds do)."""
    if isinstance(mask, (masks_lib.And, masks_lib.Or)):
        return mask_uses_rel(mask.a) or mask_uses_rel(mask.b)
    return not isinstance(mask, _REL_FREE)


def axis_size(axis_name) -> int:
    return int(jax.lax.axis_size(axis_name))


def local_positions(n: int, axis_name) -> Array:
    """Global positions of a contiguous shard: ``axis_index · n + arange(n)`` (int32 ``[n]``)."""
    return jax.lax.axis_index(axis_name).astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)


def check_qkv(name: str, q, k, v) -> None:
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: {arg} must be a local shard [batch, seq/P, heads, head_dim]; got "
                             f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}")


def positions_or_default(x, n: int, axis_name, arg: str, name: str) -> Array:
    if x is None:
        return local_positions(n, axis_name)
    x = jnp.asarray(x)
    if x.shape != (n,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: {arg} must be the shard's global positions, int [{n}]; got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)


def split_segments(segment_ids, b: int, tq: int, s: int, name: str):
    """(q_seg [B, Tq], kv_seg [B, S]) int32, or (None, None)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{name}: segment_ids must be [B, T] or a pair (q_segment_ids, kv_segment_ids)")
        q_seg, kv_seg = (jnp.asarray(x, jnp.int32) for x in segment_ids)
    else:
        if tq != s:
            raise ValueError(f"{name}: a single segment_ids array needs equal q and kv shard lengths; got {tq} and {s}")
        q_seg = kv_seg = jnp.asarray(segment_ids, jnp.int32)
    if q_seg.shape != (b, tq) or kv_seg.shape != (b, s):
        raise ValueError(f"{name}: segment ids must be [batch, shard_len] = [{b}, {tq}] / [{b}, {s}]; got "
                         f"{list(q_seg.shape)} / {list(kv_seg.shape)}")
    return q_seg, kv_seg


def relative_from_gathered(pos_all, seg_all) -> Array:
    """Segment-relative positions ``[B, N]`` of a gathered (possibly permuted) sequence, in gathered order.

    Tokens are sorted by global position, runs of equal segment ids are found in that order (so a
    document split over shards, or permuted by a load-balancing layout, keeps one start), then
    unsorted.
    """
    order = jnp.argsort(pos_all)
    rel_sorted = masks_lib.segment_relative(pos_all[order], seg_all[:, order])
    return jnp.zeros_like(rel_sorted).at[:, order].set(rel_sorted)


def gathered_relative(pos, seg, axis_name) -> tuple[Array, Array]:
    """(local rel ``[B, n]``, gathered rel ``[B, N]``) from the local shard's positions and segment ids.

    One all-gather of the int metadata (``N`` + ``B·N`` int32), no float data.
    """
    n = pos.shape[0]
    pos_all = jax.lax.all_gather(pos, axis_name, tiled=True)
    seg_all = jax.lax.all_gather(seg, axis_name, axis=1, tiled=True)
    rel_all = relative_from_gathered(pos_all, seg_all)
    start = jax.lax.axis_index(axis_name) * n
    return jax.lax.dynamic_slice_in_dim(rel_all, start, n, axis=1), rel_all


def check_relative(relative_positions, b: int, tq: int, s: int, name: str):
    if not isinstance(relative_positions, (tuple, list)) or len(relative_positions) != 2:
        raise ValueError(f"{name}: relative_positions must be a pair (q_rel [B or 1, Tq], kv_rel [B or 1, S])")
    q_rel, kv_rel = (jnp.asarray(r, jnp.int32) for r in relative_positions)
    for arg, r, t in (("q_rel", q_rel, tq), ("kv_rel", kv_rel, s)):
        if r.ndim != 2 or r.shape[1] != t or r.shape[0] not in (1, b):
            raise ValueError(f"{name}: relative_positions {arg} must be [{b} or 1, {t}]; got {list(r.shape)}")
    return q_rel, kv_rel


def default_scale(scale, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)
