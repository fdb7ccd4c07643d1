"""``attention`` on TPU: lowers an :class:`AttentionCall` to the block-sparse Pallas kernels.

The kernels (``pallas_kernels.tpu.flash_attention``) take a kernel layout and splash-style step
metadata; this module builds both:

1. tiles from :mod:`seqmix.ops.tpu.tiles` for the target TPU generation, clamped to the call
   (short or ragged sequences, GQA groups stacked as ``G·block_q`` rows, a VMEM budget);
2. positions, segment-relative positions and segment ids padded to block multiples (padded keys get
   position −1 = invalid) and packed as int32 coordinate rows;
3. EMPTY / PARTIAL / FULL per (q block, kv chunk) from :func:`seqmix.ops.block_meta.classify_blocks`
   (which already folds in segments and padding); per-block kinds derived from the chunks, compacted
   into step lists for the forward and dq grids and, transposed, for the dkv grid;
4. the mask predicate as a plain callable on int32 arrays, evaluated in-kernel on PARTIAL chunks.
   Masks whose predicate cannot run in a kernel (``Explicit``: a gather from a host matrix) are
   refused by ``supports`` with the reason (:mod:`seqmix.ops.kernel_mask`), so dispatch falls back to XLA.

Registered as ``Implementation("pallas_tpu", platforms=("tpu",), rank=10)``. On CPU the same code runs
in Pallas interpret mode when named explicitly (``impl="pallas_tpu"``): that is how it is tested.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _target
from pallas_kernels.tpu import flash_attention as fa
from seqmix.ops import _registry, block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention_call import AttentionCall, finish
from seqmix.ops.block_meta import pad_to
from seqmix.ops.kernel_mask import predicate_problem
from seqmix.ops.tpu import tiles as tpu_blocks

MIN_Q_LEN = 65  # shorter query blocks belong to a decode kernel (FAMILIES.md §3.5)
MAX_STEP_ENTRIES = 1 << 16  # int32 metadata entries per kernel in SMEM (1 MiB per core)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_DEFAULT_SCOPED_VMEM = 16 * 1024 * 1024


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class _Plan:
    tiles: fa.FlashTiles
    generation: str
    vmem_limit_bytes: int | None
    padded_q: int
    padded_kv: int


def _fit_length(length: int, block: int, align: int, max_pad: float) -> int:
    """One block if the (aligned) length fits in it; else halve ``block`` (keeping multiples of
    ``align``) while padding ``length`` to it would waste more than ``max_pad`` of the work."""
    if _round_up(length, align) <= block:
        return _round_up(length, align)
    while (block // 2 >= align and (block // 2) % align == 0
           and _round_up(length, block) - length > max_pad * length):
        block //= 2
    return block


def _fit_kv(length: int, block: int, chunk: int, align: int, max_pad: float) -> tuple[int, int]:
    block = _fit_length(length, block, align, max_pad)
    if block <= chunk:
        return block, block
    return block, math.gcd(block, chunk)


def _vmem_estimate(tiles: fa.FlashTiles, g: int, d: int, dv: int, itemsize: int) -> int:
    """Rough peak VMEM bytes of the largest of the three kernels (double-buffered blocks + scratch
    + ~4 live fp32 score tiles)."""
    lanes = fa.NUM_LANES
    rows, bkv, bkc = g * tiles.block_q, tiles.block_kv, tiles.block_kv_compute
    fwd = (2 * rows * (d + dv) * itemsize + 2 * bkv * (d + dv) * itemsize + 2 * g * 8 * tiles.block_q * 4
           + 2 * rows * lanes * 4 + rows * dv * 4 + 4 * rows * bkc * 4)
    rows_b, bkv_b, bkc_b = g * tiles.block_q_bwd, tiles.block_kv_bwd, tiles.block_kv_compute_bwd
    dq = (2 * rows_b * (2 * d + dv) * itemsize + 2 * bkv_b * (d + dv) * itemsize
          + 2 * rows_b * lanes * 4 + rows_b * d * 4 + 4 * rows_b * bkc_b * 4)
    dkv = (2 * rows_b * (d + dv) * itemsize + 4 * bkv_b * (d + dv) * itemsize + bkv_b * (d + dv) * 4
           + 4 * bkv_b * tiles.block_q_bwd * 4)
    return max(fwd, dq, dkv)


def plan(call: AttentionCall) -> _Plan:
    """Tiles for this call on the current target. Raises NotImplementedError if none fit."""
    gen, blocks = tpu_blocks.current()
    t = blocks.tiles
    b, tq, hq, d = call.q.shape
    s, hkv = call.k.shape[1], call.k.shape[2]
    dv = call.v.shape[-1]
    g = hq // hkv
    qa, ka = blocks.q_align, blocks.kv_align

    def fit_q(bq):
        while g * bq > blocks.max_rows and bq // 2 >= qa and (bq // 2) % qa == 0:
            bq //= 2
        return _fit_length(tq, bq, qa, blocks.max_pad)

    bq, bq_b = fit_q(t.block_q), fit_q(t.block_q_bwd)
    bkv, bkc = _fit_kv(s, t.block_kv, t.block_kv_compute, ka, blocks.max_pad)
    bkv_b, bkc_b = _fit_kv(s, t.block_kv_bwd, t.block_kv_compute_bwd, ka, blocks.max_pad)
    tiles = fa.FlashTiles(bq, bkv, bkc, bq_b, bkv_b, bkc_b)
    limit = blocks.vmem_limit_bytes
    budget = int(0.75 * (limit or _DEFAULT_SCOPED_VMEM))
    itemsize = jnp.dtype(call.q.dtype).itemsize
    while _vmem_estimate(tiles, g, d, dv, itemsize) > budget:
        # Halve the largest tile that can shrink (large D or G, fp32).
        cands = [("block_kv_compute", ka), ("block_kv_compute_bwd", ka), ("block_q", qa),
                 ("block_q_bwd", qa), ("block_kv", ka), ("block_kv_bwd", ka)]
        changed = False
        for name, align in sorted(cands, key=lambda c: -getattr(tiles, c[0])):
            val = getattr(tiles, name)
            if val // 2 >= align and (val // 2) % align == 0:
                new = dataclasses.replace(tiles, **{name: val // 2})
                if (new.block_kv % new.block_kv_compute == 0
                        and new.block_kv_bwd % new.block_kv_compute_bwd == 0):
                    tiles, changed = new, True
                    break
        if not changed:
            raise NotImplementedError(
                f"no tiles fit {budget >> 20} MiB of VMEM for G={g}, head_dim={d}, v_head_dim={dv}")
    # Pad once for both passes: to the larger block; the smaller one must divide the padded length.
    tp = _round_up(tq, max(tiles.block_q, tiles.block_q_bwd))
    sp = _round_up(s, max(tiles.block_kv, tiles.block_kv_bwd))
    bkv, bkv_b = math.gcd(tiles.block_kv, sp), math.gcd(tiles.block_kv_bwd, sp)
    tiles = fa.FlashTiles(math.gcd(tiles.block_q, tp), bkv, math.gcd(tiles.block_kv_compute, bkv),
                          math.gcd(tiles.block_q_bwd, tp), bkv_b, math.gcd(tiles.block_kv_compute_bwd, bkv_b))
    return _Plan(tiles, gen, limit, tp, sp)


# ----------------------------------------------------------------------------- metadata


def step_lists(cls):
    """``cls [n_outer, n_inner]`` (EMPTY/PARTIAL/FULL) -> flattened packed steps ``[n_outer·n_inner]``.

    Row ``o`` lists its non-empty inner blocks in increasing order, then repeats the last one with
    kind EMPTY (no new DMA, body skipped); a row with no block points at block 0.
    """
    n_outer, n_inner = cls.shape
    nonempty = cls != masks_lib.EMPTY
    order = jnp.argsort(jnp.logical_not(nonempty), axis=1, stable=True).astype(jnp.int32)
    count = nonempty.sum(1, dtype=jnp.int32)[:, None]
    t = jnp.arange(n_inner, dtype=jnp.int32)[None, :]
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0), axis=1)
    live = t < count
    block = jnp.where(live, order, last)
    kind = jnp.where(live, jnp.take_along_axis(cls, order, axis=1), fa.EMPTY)
    return fa.step_entry(block, kind).astype(jnp.int32).reshape(-1)


def block_kinds(chunk_cls, nc: int):
    """Chunk kinds ``[nq, nk·nc]`` -> block kinds ``[nq, nk]``: EMPTY if every chunk is, FULL if every
    chunk is, else PARTIAL (tighter than classifying the whole block from its ranges)."""
    c = chunk_cls.reshape(chunk_cls.shape[0], -1, nc)
    return jnp.where(jnp.all(c == masks_lib.FULL, -1), masks_lib.FULL,
                     jnp.where(jnp.all(c == masks_lib.EMPTY, -1), masks_lib.EMPTY, masks_lib.PARTIAL))


def coordinate_rows(pos, rel, seg, lead: tuple[int, ...], length: int, extra=()):
    """int32 ``[*lead, R, length]``: rows pos, rel, seg (0 without segments), the ``extra`` rows, then
    zeros up to a multiple of 8 rows (whole sublane tiles). Each row broadcasts to ``[*lead, length]``."""
    shape = tuple(lead) + (length,)
    rows = [pos, rel, jnp.zeros((), jnp.int32) if seg is None else seg, *extra]
    rows += [jnp.zeros((), jnp.int32)] * (-len(rows) % fa.COORD_ROWS)
    return jnp.stack([jnp.broadcast_to(r, shape) for r in rows], axis=-2).astype(jnp.int32)


def chunk_major(coords, chunk: int):
    """[B, 8, S] -> [B, S/chunk, 8, chunk]."""
    b, r, s = coords.shape
    return coords.reshape(b, r, s // chunk, chunk).transpose(0, 2, 1, 3)


def _metadata(call: AttentionCall, p: _Plan):
    b = call.q.shape[0]
    tp, sp = p.padded_q, p.padded_kv
    c = block_meta.pad_coordinates(call, tp, sp)

    def classify(bq, bkv, bkc):
        """Per-chunk kinds [nq·nk·nc] and per-block kinds [nq, nk] derived from them."""
        cls_c = block_meta.classify_padded(call.mask, c, bq, bkc)
        return cls_c.reshape(-1), block_kinds(cls_c, bkv // bkc)

    t = p.tiles
    chunks_f, cls_f = classify(t.block_q, t.block_kv, t.block_kv_compute)
    chunks_b, cls_b = classify(t.block_q_bwd, t.block_kv_bwd, t.block_kv_compute_bwd)
    kv_coords = coordinate_rows(c.kv_pos, c.kv_rel, c.kv_seg, (b,), sp)
    fwd = (step_lists(cls_f), chunks_f, chunk_major(kv_coords, t.block_kv_compute))
    bwd = (step_lists(cls_b), step_lists(cls_b.T), chunks_b,
           chunk_major(kv_coords, t.block_kv_compute_bwd))
    meta = (fwd, bwd)
    return meta, coordinate_rows(c.q_pos, c.q_rel, c.q_seg, (b,), tp)


@functools.lru_cache(maxsize=512)
def _density_cached(mask, tq: int, s: int, bq: int, bkc: int, tp: int, sp: int) -> float:
    with jax.ensure_compile_time_eval():
        q_pos = jnp.asarray(np.minimum(s - tq + np.arange(tp), s - 1), jnp.int32)
        kv_pos = jnp.asarray(np.where(np.arange(sp) < s, np.arange(sp), -1), jnp.int32)
        cls = block_meta.classify_blocks(mask, q_pos, kv_pos, q_pos[None], kv_pos[None], None, None,
                                        jnp.arange(tp) < tq, bq, bkc)
        return float(np.mean(np.asarray(cls) != masks_lib.EMPTY))


def default_density(mask, tq: int, s: int, bq: int, bkc: int, tp: int, sp: int) -> float:
    """Fraction of non-empty (q block, kv chunk) pairs for default positions and no segments.

    Only feeds the kernels' XLA cost estimates (the real metadata is dynamic); 1.0 if unknown.
    """
    try:
        return _density_cached(mask, tq, s, bq, bkc, tp, sp)
    except Exception:  # noqa: BLE001 - unhashable or untraceable mask: assume dense
        return 1.0


# ----------------------------------------------------------------------------- implementation


def fp32_highest() -> bool:
    """Whether fp32 matmuls should be exact: ``jax_default_matmul_precision`` is highest / float32
    (FAMILIES.md §5.1 rule 8; seqmix's tests set it). Mosaic's own default uses fewer passes."""
    prec = jax.config.jax_default_matmul_precision
    return prec is not None and str(prec).lower().rsplit(".", 1)[-1] in {"highest", "float32"}


def _config(call: AttentionCall, p: _Plan) -> fa.FlashConfig:
    pair_fn = block_meta.PairPredicate(call.mask, segments=call.q_seg is not None)
    return fa.FlashConfig(scale=float(call.scale), soft_cap=call.soft_cap, pair_fn=pair_fn,
                          has_sinks=call.sink_logits is not None,
                          tiles=p.tiles, vmem_limit_bytes=p.vmem_limit_bytes,
                          interpret=_target.interpret_params(), fp32_highest=fp32_highest(),
                          density=default_density(call.mask, call.q.shape[1], call.k.shape[1],
                                                  p.tiles.block_q, p.tiles.block_kv_compute,
                                                  p.padded_q, p.padded_kv))


def attention_pallas_tpu(call: AttentionCall):
    """Block-sparse flash attention (forward and backward Pallas TPU kernels)."""
    p = plan(call)
    b, tq, hq, d = call.q.shape
    s, hkv = call.k.shape[1], call.k.shape[2]
    dv = call.v.shape[-1]
    g = hq // hkv
    tp, sp = p.padded_q, p.padded_kv
    (fwd_meta, bwd_meta), q_coords = _metadata(call, p)
    q = pad_to(call.q, 1, tp, 0).reshape(b, tp, hkv, g, d).transpose(0, 2, 3, 1, 4)
    k = pad_to(call.k, 1, sp, 0).transpose(0, 2, 1, 3)
    v = pad_to(call.v, 1, sp, 0).transpose(0, 2, 1, 3)
    if call.sink_logits is None:
        sinks = jnp.zeros((hq,), jnp.float32)
    else:
        sinks = call.sink_logits.astype(jnp.float32)
    o, lse = fa.flash_attention(_config(call, p), q, k, v, sinks, q_coords, fwd_meta, bwd_meta)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, tp, hq, dv)[:, :tq]
    lse = lse.reshape(b, hq, tp)[:, :, :tq]
    return finish(call, o, lse)


def supports(call: AttentionCall) -> str | None:
    dtype = jnp.dtype(call.q.dtype)
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the TPU kernel takes float32 or bfloat16)"
    tq = call.q.shape[1]
    if tq < MIN_Q_LEN:
        return (f"q length {tq} < {MIN_Q_LEN}: short queries and decode belong to a decode kernel "
                "(FAMILIES.md §3.5), not a prefill kernel padded to a 128-row block")
    if not isinstance(call.mask, masks_lib.Full):
        problem = predicate_problem(call.mask)
        if problem:
            return problem
    try:
        p = plan(call)
    except NotImplementedError as err:
        return str(err)
    return metadata_problem(p, tables=1)


def metadata_problem(p: _Plan, tables: int) -> str | None:
    """None if ``tables`` chunk tables of plan ``p`` fit the SMEM budget, else why not."""
    t = p.tiles
    n_fwd = (p.padded_q // t.block_q) * (p.padded_kv // t.block_kv_compute)
    n_bwd = (p.padded_q // t.block_q_bwd) * (p.padded_kv // t.block_kv_compute_bwd)
    n = tables * max(n_fwd, n_bwd)
    if n > MAX_STEP_ENTRIES:
        return (f"{n} (q block, kv chunk) pairs ({tables} table(s)) exceed the {MAX_STEP_ENTRIES} "
                "int32 metadata entries kept in SMEM; use larger tiles or ring attention")
    return None


def describe(call: AttentionCall) -> str:
    try:
        p = plan(call)
    except NotImplementedError as err:
        return f"no tiles: {err}"
    t = p.tiles
    g = call.groups
    return (f"pallas_tpu flash kernels [{p.generation}]: fwd block_q={t.block_q} x {g} heads, "
            f"block_kv={t.block_kv} (compute {t.block_kv_compute}); dq/dkv block_q={t.block_q_bwd}, "
            f"block_kv={t.block_kv_bwd} (compute {t.block_kv_compute_bwd})")


IMPLEMENTATION = _registry.Implementation(
    "pallas_tpu", attention_pallas_tpu, rank=10, backend="tpu", evidence=("tpu:interpret", "tpu:aot"),
    supports=supports, describe=describe)
