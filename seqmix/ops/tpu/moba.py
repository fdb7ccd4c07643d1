"""``moba`` on TPU: the block-sparse flash kernels of ``attention`` with MoBA's gated selection.

MoBA's choice differs per query head, so the kernels run with ``per_head`` (FAMILIES.md §2.3, §3.2):

1. the gate (:func:`seqmix.ops.moba_xla.gate`, plain XLA, fp32, not differentiated) picks each query
   head's ``topk − 1`` past blocks;
2. per (batch row, kv head) a table of chunk kinds: a (q block, kv chunk) pair is PARTIAL when any
   query of the block, in any head of the group, attends to a key of the chunk (its own block up to
   itself, or a chosen block), else EMPTY, so the kernels never load a key tile nobody chose. No chunk
   is called FULL: the per-query selection is evaluated in-kernel on every live chunk;
3. query coordinates per head, rows ``(pos, rel, seg, own block, chosen blocks…)``, key coordinates
   ``(pos, rel, seg, block)``; :class:`MoBAPair` is the in-kernel predicate (causal, same document,
   own or chosen block);
4. rows whose gate met a NaN become NaN afterwards (:func:`seqmix.ops.moba.poison_rows`), as in the
   reference.

Tiles come from the attention kernels' plan (:func:`seqmix.ops.tpu.attention.plan`) for the target TPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _target
from pallas_kernels.tpu import flash_attention as fa
from seqmix.ops import _registry, block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention_call import finish
from seqmix.ops.block_meta import pad_to
from seqmix.ops.moba import MoBACall, poison_rows
from seqmix.ops.moba_xla import gate, listed_tiles
from seqmix.ops.tpu import attention as tpu_attention

BLK = 3  # coordinate row of the block index inside the document; the query's chosen blocks follow it


@dataclasses.dataclass(frozen=True)
class MoBAPair:
    """The in-kernel predicate: key valid and not after the query, same document, and in the query's
    own block or one of its ``n_chosen`` chosen blocks (rows ``BLK + 1 …``; ``-1`` = none)."""

    n_chosen: int

    def __call__(self, q, kv):
        pos, seg = fa.POS, fa.SEG
        ok = (kv[pos] >= 0) & (kv[pos] <= q[pos]) & (kv[seg] == q[seg])
        sel = kv[BLK] == q[BLK]
        for i in range(self.n_chosen):
            sel = sel | (kv[BLK] == q[BLK + 1 + i])
        return ok & sel


def _tables(call: MoBACall, chosen, bq: int, bkv: int, bkc: int, tp: int, sp: int):
    """Chunk kinds ``[B·Hkv·nq·nk·nc]`` and block kinds ``[B·Hkv, nq, nk]`` for tiles (bq, bkv, bkc)."""
    listed = listed_tiles(call, chosen, bq, bkc, tp, sp).any(2)  # [B, Hkv, nq, S/bkc]: union of the group
    cls_c = jnp.where(listed, masks_lib.PARTIAL, masks_lib.EMPTY).astype(jnp.int32)
    cls_c = cls_c.reshape((-1,) + cls_c.shape[2:])
    cls_b = jax.vmap(lambda c: tpu_attention.block_kinds(c, bkv // bkc))(cls_c)
    return cls_c.reshape(-1), cls_b


def _metadata(call: MoBACall, p, chosen):
    """(fwd_meta, bwd_meta) with per-(batch, kv head) tables, and q coordinates ``[B, Hkv, G, R, Tp]``."""
    a, bs = call.attention, call.block_size
    b, hkv = a.q.shape[0], a.k.shape[2]
    tp, sp, t = p.padded_q, p.padded_kv, p.tiles
    c = block_meta.pad_coordinates(a, tp, sp)
    steps = jax.vmap(tpu_attention.step_lists)
    chunks_f, cls_f = _tables(call, chosen, t.block_q, t.block_kv, t.block_kv_compute, tp, sp)
    chunks_b, cls_b = _tables(call, chosen, t.block_q_bwd, t.block_kv_bwd, t.block_kv_compute_bwd, tp, sp)
    kv_coords = tpu_attention.coordinate_rows(c.kv_pos, c.kv_rel, c.kv_seg, (b,), sp,
                                              extra=(jnp.where(c.kv_pos >= 0, c.kv_rel // bs, -1),))
    fwd = (steps(cls_f).reshape(-1), chunks_f, tpu_attention.chunk_major(kv_coords, t.block_kv_compute))
    bwd = (steps(cls_b).reshape(-1), steps(cls_b.transpose(0, 2, 1)).reshape(-1), chunks_b,
           tpu_attention.chunk_major(kv_coords, t.block_kv_compute_bwd))
    per_head = lambda x: x[:, None, None]  # noqa: E731 - [B, Tp] rows shared by every head
    chosen_rows = pad_to(jnp.moveaxis(chosen, -1, -2), 4, tp, -1)  # [B, Hkv, G, K, Tp]
    g = a.groups
    q_seg = None if c.q_seg is None else per_head(c.q_seg)
    q_coords = tpu_attention.coordinate_rows(
        c.q_pos, per_head(c.q_rel), q_seg, (b, hkv, g), tp,
        extra=(per_head(c.q_rel // bs),) + tuple(chosen_rows[..., i, :] for i in range(chosen.shape[-1])))
    return (fwd, bwd), q_coords


def moba_pallas_tpu(call: MoBACall):
    """MoBA by the block-sparse flash kernels (forward and backward Pallas TPU kernels)."""
    a = call.attention
    p = tpu_attention.plan(a)
    b, tq, hq, d = a.q.shape
    s, hkv = a.k.shape[1], a.k.shape[2]
    dv, g = a.v.shape[-1], a.groups
    tp, sp = p.padded_q, p.padded_kv
    chosen, unrankable = jax.lax.stop_gradient(gate(call))
    (fwd_meta, bwd_meta), q_coords = _metadata(call, p, chosen)
    cfg = fa.FlashConfig(scale=float(a.scale), soft_cap=None, pair_fn=MoBAPair(chosen.shape[-1]),
                         has_sinks=False, tiles=p.tiles, vmem_limit_bytes=p.vmem_limit_bytes,
                         interpret=_target.interpret_params(), fp32_highest=tpu_attention.fp32_highest(),
                         density=min(1.0, call.topk * call.block_size / s), per_head=True)
    q = pad_to(a.q, 1, tp, 0).reshape(b, tp, hkv, g, d).transpose(0, 2, 3, 1, 4)
    k = pad_to(a.k, 1, sp, 0).transpose(0, 2, 1, 3)
    v = pad_to(a.v, 1, sp, 0).transpose(0, 2, 1, 3)
    o, lse = fa.flash_attention(cfg, q, k, v, jnp.zeros((hq,), jnp.float32), q_coords, fwd_meta, bwd_meta)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, tp, hq, dv)[:, :tq]
    lse = lse.reshape(b, hq, tp)[:, :, :tq]
    return poison_rows(a, finish(a, o, lse), unrankable)


def supports(call: MoBACall) -> str | None:
    reason = tpu_attention.supports(call.attention)
    if reason is not None:
        return reason
    a = call.attention
    return tpu_attention.metadata_problem(tpu_attention.plan(a), tables=a.q.shape[0] * a.k.shape[2])


def describe(call: MoBACall) -> str:
    return (f"{tpu_attention.describe(call.attention)}; a step table per (batch, kv head), "
            f"block_size={call.block_size}, topk={call.topk}")


IMPLEMENTATION = _registry.Implementation(
    "pallas_tpu", moba_pallas_tpu, rank=10, backend="tpu", evidence=("tpu:interpret", "tpu:aot"),
    supports=supports, describe=describe)
