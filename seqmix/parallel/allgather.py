"""All-gather KV (Llama-3 style context parallelism; FAMILIES.md §4.4, the softmax half of LASP-2H).

Inside ``jax.shard_map``: q stays sharded; k, v, their global positions and segment ids are
all-gathered along the sequence axis and the single-device :func:`seqmix.ops.attention` runs on
(local q, full kv). Its backward reduce-scatters dk, dv (the transpose of the gather). Any mask and
any layout work, since masks read global positions. Full K/V is resident on every device
(O(N·H_kv·D)). k and v travel in one all-gather (concatenated on the feature axis), the int metadata in
another. Use ``jax.shard_map(..., check_vma=False)`` (see :mod:`seqmix.parallel.ring`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.ops import masks as masks_lib
from seqmix.ops.attention import attention
from seqmix.parallel import _common


def allgather_attention(q, k, v, *, axis_name, mask=None, q_positions=None, kv_positions=None, segment_ids=None,
                        relative_positions=None, sink_logits=None, soft_cap=None, scale=None, impl=None,
                        return_lse=False):
    """All-gather-KV attention over ``axis_name``; same arguments and results as :func:`~seqmix.parallel.ring_attention`."""
    name = "allgather_attention"
    _common.check_qkv(name, q, k, v)
    b, n, hq, d = q.shape
    s = k.shape[1]
    mask = masks_lib.Full() if mask is None else mask
    q_seg, kv_seg = _common.split_segments(segment_ids, b, n, s, name)
    q_pos = _common.positions_or_default(q_positions, n, axis_name, "q_positions", name)
    kv_pos = _common.positions_or_default(kv_positions, s, axis_name, "kv_positions", name)
    gather_seq = lambda x, axis: jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)  # noqa: E731
    # One gather for k‖v (concatenated on the feature axis) and one for the int metadata rows
    # (positions, segment ids, relative positions) instead of one per tensor.
    dk = k.shape[-1]
    kvg = gather_seq(jnp.concatenate([k, v], axis=-1), 1)
    kg, vg = kvg[..., :dk], kvg[..., dk:]
    rows = [kv_pos[None]]
    if q_seg is not None:
        rows.append(kv_seg)
    if relative_positions is not None:
        q_rel, kv_rel = _common.check_relative(relative_positions, b, n, s, name)
        rows.append(kv_rel)
    meta = gather_seq(jnp.concatenate(rows, axis=0), 1)
    kv_pos_g = meta[0]
    seg = rel = None
    if q_seg is not None:
        kv_seg_g = meta[1:1 + b]
        seg = (q_seg, kv_seg_g)
    if relative_positions is not None:
        rel = (q_rel, meta[1 + (b if q_seg is not None else 0):])
    elif q_seg is not None and _common.mask_uses_rel(mask):
        kv_rel_g = _common.relative_from_gathered(kv_pos_g, kv_seg_g)
        if kv_seg is q_seg and q_positions is kv_positions and n == s:  # self-attention: q rel = my slice
            start = jax.lax.axis_index(axis_name) * n
            q_rel = jax.lax.dynamic_slice_in_dim(kv_rel_g, start, n, axis=1)
        else:
            q_rel, _ = _common.gathered_relative(q_pos, q_seg, axis_name)
        rel = (q_rel, kv_rel_g)
    return attention(q, kg, vg, mask=mask, segment_ids=seg, scale=scale, sink_logits=sink_logits,
                     soft_cap=soft_cap, return_lse=return_lse, q_positions=q_pos, kv_positions=kv_pos_g,
                     relative_positions=rel, impl=impl)


def allgather_moba(q, k, v, *, axis_name, block_size, topk, segment_ids=None, scale=None, impl=None,
                   return_lse=False, block_q=128, block_kv=128):
    """All-gather-KV :func:`seqmix.ops.moba` over ``axis_name`` (contiguous shards, no layout permutation).

    q ``[B, n, Hq, D]``, k/v ``[B, n, Hkv, ·]``, segment_ids ``[B, n]``: the local shard of a sequence
    split into contiguous pieces in axis order. The gate needs every key's block mean, so each device
    gathers all of K/V (one all-gather of k‖v, one of the segment ids) and runs MoBA for its queries
    (``q_offset = axis_index · n``); the backward reduce-scatters dk, dv."""
    from seqmix.ops.moba import moba

    name = "allgather_moba"
    _common.check_qkv(name, q, k, v)
    b, n = q.shape[:2]
    gather_seq = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
    dk = k.shape[-1]
    kvg = gather_seq(jnp.concatenate([k, v], axis=-1))
    kg, vg = kvg[..., :dk], kvg[..., dk:]
    offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * n
    kw = dict(block_size=block_size, topk=topk, scale=scale, impl=impl, return_lse=return_lse,
              q_offset=offset, block_q=block_q, block_kv=block_kv)
    if segment_ids is None:
        return moba(q, kg, vg, **kw)
    q_seg, _ = _common.split_segments(segment_ids, b, n, n, name)
    kv_seg = gather_seq(q_seg)
    kv_rel = masks_lib.segment_relative(jnp.arange(kg.shape[1], dtype=jnp.int32), kv_seg)
    q_rel = jax.lax.dynamic_slice_in_dim(kv_rel, offset, n, axis=1)
    return moba(q, kg, vg, segment_ids=(q_seg, kv_seg), relative_positions=(q_rel, kv_rel), **kw)
