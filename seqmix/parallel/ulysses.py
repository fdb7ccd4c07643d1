"""Ulysses sequence parallelism (DeepSpeed-Ulysses, 2309.14509; FAMILIES.md §4.3).

Inside ``jax.shard_map``: one ``all_to_all`` per tensor trades the sequence split for a head split
(q, k, v: ``[B, N/P, H, D] -> [B, N, H/P, D]``), the positions and segment ids are all-gathered, the
single-device :func:`seqmix.ops.attention` runs on the full sequence for ``H/P`` heads, and the inverse
``all_to_all`` brings ``o`` (and ``lse``) back to ``[B, N/P, H, ·]``. Needs ``H_q % P == 0`` and
``H_kv % P == 0``: GQA groups stay intact (local q head ``h`` of device ``r`` reads local kv head
``h // (H_q / H_kv)``). Causal masks are balanced by construction; permuted layouts work through the
global positions. Use ``jax.shard_map(..., check_vma=False)`` (see :mod:`seqmix.parallel.ring`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.ops import masks as masks_lib
from seqmix.ops.attention import attention
from seqmix.parallel import _common


def ulysses_attention(q, k, v, *, axis_name, mask=None, q_positions=None, kv_positions=None, segment_ids=None,
                      relative_positions=None, sink_logits=None, soft_cap=None, scale=None, impl=None,
                      return_lse=False):
    """Ulysses attention over ``axis_name``; same arguments and results as :func:`~seqmix.parallel.ring_attention`.

    Raises NotImplementedError unless the axis size divides both the q heads and the kv heads.
    """
    name = "ulysses_attention"
    _common.check_qkv(name, q, k, v)
    b, n, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    size = _common.axis_size(axis_name)
    if hq % size or hkv % size:
        raise NotImplementedError(
            f"{name}: the sequence axis size P={size} must divide the q heads ({hq}) and the kv heads ({hkv}); "
            f"use ring_attention or allgather_attention, or repeat kv heads up to a multiple of P")
    mask = masks_lib.Full() if mask is None else mask
    q_seg, kv_seg = _common.split_segments(segment_ids, b, n, s, name)
    q_pos = _common.positions_or_default(q_positions, n, axis_name, "q_positions", name)
    kv_pos = _common.positions_or_default(kv_positions, s, axis_name, "kv_positions", name)
    if relative_positions is not None:
        relative_positions = _common.check_relative(relative_positions, b, n, s, name)
    if sink_logits is not None:
        if tuple(jnp.shape(sink_logits)) != (hq,):
            raise ValueError(f"{name}: sink_logits must be [q_heads] = [{hq}]; got {list(jnp.shape(sink_logits))}")
        r = jax.lax.axis_index(axis_name)
        sink_logits = jax.lax.dynamic_slice_in_dim(sink_logits, r * (hq // size), hq // size)

    to_heads = lambda x: jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
    gather_seq = lambda x, axis: jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)  # noqa: E731
    qg, kg, vg = to_heads(q), to_heads(k), to_heads(v)
    q_pos_g = gather_seq(q_pos, 0)
    kv_pos_g = q_pos_g if q_positions is kv_positions and n == s else gather_seq(kv_pos, 0)
    seg = rel = None
    if q_seg is not None:
        q_seg_g = gather_seq(q_seg, 1)
        kv_seg_g = q_seg_g if kv_seg is q_seg else gather_seq(kv_seg, 1)
        seg = (q_seg_g, kv_seg_g)
    if relative_positions is not None:
        rel = (gather_seq(relative_positions[0], 1), gather_seq(relative_positions[1], 1))
    elif q_seg is not None and _common.mask_uses_rel(mask):
        q_rel = _common.relative_from_gathered(q_pos_g, seg[0])
        kv_rel = _common.relative_from_gathered(kv_pos_g, seg[1])
        rel = (q_rel, kv_rel)
    out = attention(qg, kg, vg, mask=mask, segment_ids=seg, scale=scale, sink_logits=sink_logits,
                    soft_cap=soft_cap, return_lse=return_lse, q_positions=q_pos_g, kv_positions=kv_pos_g,
                    relative_positions=rel, impl=impl)
    to_seq = lambda x: jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)  # noqa: E731
    if not return_lse:
        return to_seq(out)
    o, lse = out
    # lse [B, Hq/P, N] -> [B, Hq, N/P]
    return to_seq(o), jax.lax.all_to_all(lse, axis_name, split_axis=2, concat_axis=1, tiled=True)
