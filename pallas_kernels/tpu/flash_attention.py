"""Block-sparse flash attention for TPU (Pallas / Mosaic): forward, dq and dkv kernels.

Algorithms: FAMILIES.md §3.1 (online softmax), §3.2 (splash-style block metadata), §3.3 (backward),
§3.5 (GQA). This module is raw kernels plus their ``custom_vjp``; it imports nothing from ``seqmix``.
The caller (``seqmix.ops.tpu.attention``) lays the data out, builds the metadata and passes the
mask predicate as a plain callable.

Kernel layout (the caller transposes from the API's ``[B, T, H, D]``):

* ``q [B, Hkv, G, Tp, D]``: the ``G = Hq / Hkv`` query heads of a kv head sit together; the forward
  and dq kernels stack them as ``G·block_q`` rows of one tile, so K/V are read once per group and
  never repeated in HBM. ``k [B, Hkv, Sp, D]``, ``v [B, Hkv, Sp, Dv]``.
* ``o [B, Hkv, G, Tp, Dv]`` (input dtype), ``lse [B, Hkv, G, 1, Tp]`` fp32 (lane-dense rows).
* coordinates, int32, rows ``(pos, rel, seg, ...)`` (a multiple of 8 rows; rows past ``seg`` are the
  caller's, e.g. MoBA's block ids): what a partial chunk needs to evaluate the mask: ``q_coords
  [B, R, Tp]`` and ``kv_coords [B, Sp/chunk, R', chunk]`` (chunk-major, so a kernel picks a kv chunk
  by a leading index). A padded key has ``pos < 0`` and is never attended. With ``per_head`` (a mask
  that depends on the query head, e.g. MoBA's gated blocks) ``q_coords`` is ``[B, Hkv, G, R, Tp]``.
* ``sinks [Hq]`` fp32 (zeros and ignored unless ``has_sinks``).

Block metadata (splash style), in SMEM through scalar prefetch (``PrefetchScalarGridSpec``), flattened
to 1-D int32: one table shared by every batch row and head, or with ``per_head`` one table per
(batch row, kv head) (table ``b·Hkv + h``; a table's step lists cover the union of its G query heads):

* ``steps``: for each outer block (q block in the forward and dq kernels, kv block in the dkv kernel)
  ``n_inner`` entries ``(inner block << 2) | kind``. Non-empty blocks come first in increasing
  order; the tail repeats the last non-empty block with kind EMPTY, so the pipeline issues no new DMA
  (same block index) and ``pl.when`` skips the body.
* ``chunks``: EMPTY(0) / PARTIAL(1) / FULL(2) for every (q block, kv block, kv chunk of
  ``block_kv_compute`` keys). Inside a live block each chunk is skipped (EMPTY), computed without a
  mask (FULL), or masked with ``pair_fn(q, kv)`` evaluated in-kernel (PARTIAL; ``q`` and ``kv`` are
  tuples of the coordinate rows, broadcasting against each other): the caller's one definition of an
  allowed pair (mask, key validity, segments). Large blocks keep DMA and per-step overhead
  low while chunks keep the causal diagonal's wasted work and the fp32 score tile small.

Grids: forward and dq ``(B, Hkv, n_q_blocks, n_kv_blocks)``; dkv ``(B, Hkv, n_kv_blocks, n_q_blocks)``
with its own (transposed) step lists; the last axis is sequential ("arbitrary"), the others parallel.

Numerics: fp32 scores (``preferred_element_type``), fp32 ``(m, l, acc)`` scratch with the ``m_use``
guard, soft cap ``c·tanh(s/c)`` before masking, sink logits join the denominator at the end, fully
masked rows give ``o = 0`` and ``lse = -inf`` (``b_h`` with a sink). Backward recomputes
``p = exp(s − lse_safe)`` with ``lse_safe = +inf`` where ``lse = −inf``; ``D = rowsum(dO∘O) − dlse``
and the sink gradient are plain jnp outside the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _target
from pallas_kernels.softmax_math import sink_grad
from pallas_kernels.tpu import _compat

EMPTY, PARTIAL, FULL = 0, 1, 2
KIND_BITS = 2
KIND_MASK = (1 << KIND_BITS) - 1
COORD_ROWS = 8  # pos, rel, seg, then zero rows: one full sublane tile of int32
POS, REL, SEG = 0, 1, 2
NUM_LANES = 128

PairFn = Callable[..., Any]  # (q rows, kv rows): tuples of int32 coordinates (POS, REL, SEG, ...) -> bool

_CompilerParams = _compat.CompilerParams
_SQ = _compat.SQ
_PrefetchScalarGridSpec = _compat.PrefetchScalarGridSpec
_vmem = _compat.vmem


def _cost(cfg: FlashConfig, pairs: int, flops_per_pair: int, exp_per_pair: int, bytes_fixed: int,
          bytes_per_outer_block: int, n_outer: int) -> "pl.CostEstimate":
    """Cost estimate for XLA's scheduler: ``pairs`` (query, key) pairs scaled by the expected density."""
    live = cfg.density * pairs
    return pl.CostEstimate(flops=int(live * flops_per_pair), transcendentals=int(live * exp_per_pair),
                           bytes_accessed=int(bytes_fixed + cfg.density * n_outer * bytes_per_outer_block))


def _nbytes(*xs) -> int:
    return sum(x.size * x.dtype.itemsize for x in xs)


def _parallel(n_parallel: int):
    return ("parallel",) * n_parallel + ("arbitrary",)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    """Tile sizes. ``block_q`` counts rows per query head (the forward and dq kernels stack the G
    heads of a group: ``G·block_q`` rows); ``block_kv_compute`` splits a kv block into matmul chunks
    (big DMA blocks, small fp32 score tiles). The dkv kernel uses ``block_kv_bwd`` keys against
    ``block_q_bwd`` queries of one head at a time."""

    block_q: int
    block_kv: int
    block_kv_compute: int
    block_q_bwd: int
    block_kv_bwd: int
    block_kv_compute_bwd: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if not isinstance(val, int) or val < 8 or val % 8:
                raise ValueError(f"FlashTiles.{f.name} must be a positive multiple of 8; got {val!r}")
        if self.block_kv % self.block_kv_compute or self.block_kv_bwd % self.block_kv_compute_bwd:
            raise ValueError(f"block_kv_compute must divide block_kv: {self}")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static settings of one attention call (hashable; a ``custom_vjp`` non-differentiable arg)."""

    scale: float
    soft_cap: float | None
    pair_fn: PairFn  # which (query, key) pairs of a PARTIAL chunk are allowed
    has_sinks: bool
    tiles: FlashTiles
    vmem_limit_bytes: int | None = None
    interpret: Any = None  # pallas_call(interpret=...): None compiles with Mosaic
    density: float = 1.0  # expected fraction of non-empty block pairs: only for XLA cost estimates
    fp32_highest: bool = False  # fp32 operands: exact fp32 matmuls (else Mosaic's default passes)
    per_head: bool = False  # q coordinates per query head, step/chunk tables per (batch, kv head)


def step_entry(block, kind):
    """Pack a metadata entry."""
    return (block << KIND_BITS) | kind


# ----------------------------------------------------------------------------- in-kernel helpers


def _precision(cfg: FlashConfig, a):
    """Explicit, so ``jax_default_matmul_precision`` cannot ask Mosaic for fp32 passes on bf16
    operands (it rejects them); fp32 operands get exact passes when ``cfg.fp32_highest``."""
    if cfg.fp32_highest and a.dtype == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _nt(cfg: FlashConfig, a, b):
    """a @ b.T with fp32 accumulation (contract the last dims; the MXU's native transposed-rhs form)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(cfg, a),
                               preferred_element_type=jnp.float32)


def _nn(cfg: FlashConfig, a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(cfg, a),
                               preferred_element_type=jnp.float32)


def _col(row):
    """(1, n) or (8, n) 32-bit rows -> (n, width) columns via one aligned 2-D transpose."""
    return row.T


def _allowed(cfg: FlashConfig, q_cols, kv_rows, shape):
    """The caller's pair predicate on query coordinate columns ``(n, R)`` and key coordinate rows
    ``(R', m)``, broadcast to ``shape``."""
    q = tuple(q_cols[:, r:r + 1] for r in range(q_cols.shape[1]))
    kv = tuple(kv_rows[r:r + 1, :] for r in range(kv_rows.shape[0]))
    return jnp.broadcast_to(cfg.pair_fn(q, kv), shape)


def _allowed_t(cfg: FlashConfig, q_rows, kv_cols, shape):
    """:func:`_allowed` in the transposed orientation: query rows ``(R, n)``, key columns ``(m, R')``."""
    q = tuple(q_rows[r:r + 1, :] for r in range(q_rows.shape[0]))
    kv = tuple(kv_cols[:, r:r + 1] for r in range(kv_cols.shape[1]))
    return jnp.broadcast_to(cfg.pair_fn(q, kv), shape)


def _table(cfg: FlashConfig, b, h, hkv: int):
    """Index of the metadata table of (batch row ``b``, kv head ``h``): 0 when one table serves all."""
    return b * hkv + h if cfg.per_head else 0


def _q_columns(cfg: FlashConfig, qc_ref, g: int):
    """Query coordinates as columns: ``(bq, R)``, or ``(G·bq, R)`` (head-major) with ``per_head``."""
    if not cfg.per_head:
        return _col(qc_ref[...])
    return jnp.concatenate([_col(qc_ref[jj]) for jj in range(g)], axis=0)


def _mask_scores(cfg: FlashConfig, s, qcol, kc, g: int, bq: int, bkc: int):
    """Scores ``(G·bq, bkc)`` with disallowed pairs at -inf: one ``(bq, bkc)`` predicate shared by the
    group, or, with ``per_head``, one per row of the stacked tile."""
    rows = g * bq
    if cfg.per_head:
        return jnp.where(_allowed(cfg, qcol, kc, (rows, bkc)), s, -jnp.inf)
    ok = _allowed(cfg, qcol, kc, (bq, bkc))
    return jnp.where(ok[None], s.reshape(g, bq, bkc), -jnp.inf).reshape(rows, bkc)


def _cap(cfg: FlashConfig, s):
    """Soft cap; returns (capped scores, tanh) (tanh is None without a cap)."""
    if cfg.soft_cap is None:
        return s, None
    t = jnp.tanh(s / cfg.soft_cap)
    return cfg.soft_cap * t, t


def _load_stacked(ref, g: int):
    """The G heads of a (G, bq, D) block as one (G·bq, D) tile (head-major rows)."""
    _, bq, d = ref.shape
    return ref[...].reshape(g * bq, d)


def _store_stacked(ref, val):
    ref[...] = val.reshape(ref.shape).astype(ref.dtype)


def _group_column(rows: int, bq: int, g: int, values: Callable[[int], Any]):
    """A (rows, 1) column whose j-th run of ``bq`` rows holds ``values(j)`` (a scalar)."""
    ridx = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    col = jnp.full((rows, 1), values(0), jnp.float32)
    for j in range(1, g):
        col = jnp.where(ridx >= j * bq, values(j), col)
    return col


# ----------------------------------------------------------------------------- forward kernel


def _step(steps_ref, outer, t, n_inner):
    """(inner block index, live) of step ``t`` of outer block ``outer``."""
    entry = steps_ref[outer * n_inner + t]
    return entry >> KIND_BITS, (entry & KIND_MASK) != EMPTY


def _for_chunks(chunks_ref, base, nc: int, bkc: int, body):
    """Run ``body(c, offset, masked)`` for every non-empty kv chunk of a block: FULL chunks unmasked,
    PARTIAL chunks masked, EMPTY chunks skipped. A loop (not unrolled) keeps the kernel's code size
    independent of the number of chunks."""

    def one(c):
        kind = chunks_ref[base + c]
        off = c * bkc if isinstance(c, int) else pl.multiple_of(c * bkc, bkc)
        pl.when(kind == FULL)(lambda: body(c, off, False))
        pl.when(kind == PARTIAL)(lambda: body(c, off, True))

    if nc == 1:
        one(0)
    else:
        jax.lax.fori_loop(0, nc, lambda c, carry: (one(c), carry)[1], 0)


def _fwd_kernel(steps_ref, chunks_ref, sinks_ref, q_ref, k_ref, v_ref, qc_ref, kc_ref, o_ref,
                lse_ref, m_sc, l_sc, acc_sc, qcol_sc, *, cfg: FlashConfig, g: int, bq: int,
                bkc: int, nq: int, nk: int, nc: int, hkv: int):
    b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    rows = g * bq
    row = _table(cfg, b, h, hkv) * nq + i  # this q block's row of the step and chunk tables

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        qcol_sc[...] = _q_columns(cfg, qc_ref, g)  # (R, bq) rows -> (bq, R) columns

    j, live = _step(steps_ref, row, t, nk)

    def chunk(c, off, masked: bool):
        sl = pl.ds(off, bkc)
        q = _load_stacked(q_ref, g)
        v = v_ref[sl, :]
        s, _ = _cap(cfg, _nt(cfg, q, k_ref[sl, :]) * cfg.scale)
        if masked:
            s = _mask_scores(cfg, s, qcol_sc[...], kc_ref[c], g, bq, bkc)
        m = m_sc[:, 0:1]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no exp(-inf - (-inf))
        corr = jnp.exp(m - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = jnp.broadcast_to(corr * l_sc[:, 0:1] + jnp.sum(p, axis=1, keepdims=True), l_sc.shape)
        acc_sc[...] = corr * acc_sc[...] + _nn(cfg, p.astype(v.dtype), v)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)

    pl.when(live)(lambda: _for_chunks(chunks_ref, (row * nk + j) * nc, nc, bkc, chunk))

    @pl.when(t == nk - 1)
    def _finish():
        m = m_sc[:, 0:1]
        l = l_sc[:, 0:1]
        acc = acc_sc[...]
        if cfg.has_sinks:  # b_h joins the denominator only
            bias = _group_column(rows, bq, g, lambda jj: sinks_ref[h * g + jj])
            m2 = jnp.maximum(m, bias)
            m2_use = jnp.where(m2 == -jnp.inf, 0.0, m2)  # a -inf sink on a fully masked row: no NaN
            corr = jnp.exp(m - m2_use)
            l = l * corr + jnp.exp(bias - m2_use)
            acc = acc * corr
            m = m2
        ok = l != 0  # only fully masked rows have l == 0; NaN from the inputs propagates
        l_safe = jnp.where(ok, l, 1.0)
        _store_stacked(o_ref, jnp.where(ok, acc / l_safe, 0.0))
        lse = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)
        lse_wide = jnp.broadcast_to(lse, (rows, NUM_LANES))
        for jj in range(g):  # column -> lane-dense row, one head at a time
            lse_ref[jj] = lse_wide[jj * bq:(jj + 1) * bq, :].T[0:1, :]


def _inner_block(cfg: FlashConfig, steps_ref, hkv: int, n_outer: int, n_inner: int, b_, h_, o_, t_):
    """The inner block of step ``t_`` of outer block ``o_`` (an index map's view of the step table)."""
    return steps_ref[(_table(cfg, b_, h_, hkv) * n_outer + o_) * n_inner + t_] >> KIND_BITS


def _q_coord_spec(cfg: FlashConfig, q_coords, g: int, bq: int, block_of):
    """BlockSpec of the query coordinates: ``(R, bq)`` shared, or ``(G, R, bq)`` with ``per_head``;
    ``block_of(b, h, outer, t, *refs)`` is the q block index."""
    r = q_coords.shape[-2]
    if cfg.per_head:
        return pl.BlockSpec((_SQ, _SQ, g, r, bq), lambda b_, h_, o_, t_, *refs: (b_, h_, 0, 0, block_of(b_, h_, o_, t_, *refs)))
    return pl.BlockSpec((_SQ, r, bq), lambda b_, h_, o_, t_, *refs: (b_, 0, block_of(b_, h_, o_, t_, *refs)))


def _q_coord_scratch(cfg: FlashConfig, q_coords, g: int, bq: int):
    return _vmem(((g if cfg.per_head else 1) * bq, q_coords.shape[-2]), jnp.int32)


def _q_major_specs(cfg: FlashConfig, hkv: int, nq: int, nk: int, nc: int, bkv: int, bkc: int, kcr: int):
    """Index maps of the kv-side blocks on a (B, Hkv, q block, step) grid: k/v and kv coordinates."""

    def kv_map(b_, h_, i_, t_, steps_ref, *_):
        return (b_, h_, _inner_block(cfg, steps_ref, hkv, nq, nk, b_, h_, i_, t_), 0)

    def kc_map(b_, h_, i_, t_, steps_ref, *_):
        return (b_, _inner_block(cfg, steps_ref, hkv, nq, nk, b_, h_, i_, t_), 0, 0)

    return kv_map, pl.BlockSpec((_SQ, nc, kcr, bkc), kc_map)


def _fwd_call(cfg: FlashConfig, q, k, v, sinks, q_coords, steps, chunks, kv_coords):
    b, hkv, g, tp, d = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    tl = cfg.tiles
    bq, bkv, bkc = tl.block_q, tl.block_kv, tl.block_kv_compute
    nq, nk, nc = tp // bq, sp // bkv, bkv // bkc
    kv_map, kc_spec = _q_major_specs(cfg, hkv, nq, nk, nc, bkv, bkc, kv_coords.shape[-2])
    q_map = lambda b_, h_, i_, t_, *_: (b_, h_, 0, i_, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, g, bq, d), q_map),
        pl.BlockSpec((_SQ, _SQ, bkv, d), kv_map),
        pl.BlockSpec((_SQ, _SQ, bkv, dv), kv_map),
        _q_coord_spec(cfg, q_coords, g, bq, lambda b_, h_, i_, t_, *_: i_),
        kc_spec,
    ]
    out_specs = [
        pl.BlockSpec((_SQ, _SQ, g, bq, dv), q_map),
        pl.BlockSpec((_SQ, _SQ, g, 1, bq), lambda b_, h_, i_, t_, *_: (b_, h_, 0, 0, i_)),
    ]
    scratch = [_vmem((g * bq, NUM_LANES), jnp.float32), _vmem((g * bq, NUM_LANES), jnp.float32),
               _vmem((g * bq, dv), jnp.float32), _q_coord_scratch(cfg, q_coords, g, bq)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, g=g, bq=bq, bkc=bkc, nq=nq, nk=nk, nc=nc, hkv=hkv)
    pairs = b * hkv * g * tp * sp
    return pl.pallas_call(
        kernel,
        grid_spec=_PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=(b, hkv, nq, nk),
                                          in_specs=in_specs, out_specs=out_specs,
                                          scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, g, tp, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hkv, g, 1, tp), jnp.float32)],
        compiler_params=_CompilerParams(dimension_semantics=_parallel(3),
                                        vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, pairs, 2 * (d + dv), 1, 2 * _nbytes(q, q_coords) + b * hkv * g * tp * 4,
                            _nbytes(k, v, kv_coords), nq),
        name="seqmix_flash_fwd",
    )(steps, chunks, sinks, q, k, v, q_coords, kv_coords)


# ----------------------------------------------------------------------------- dq kernel


def _dq_kernel(steps_ref, chunks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qc_ref, kc_ref,
               dq_ref, dq_sc, lse_sc, di_sc, qcol_sc, *, cfg: FlashConfig, g: int, bq: int,
               bkc: int, nq: int, nk: int, nc: int, hkv: int):
    b, h, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = _table(cfg, b, h, hkv) * nq + i

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        qcol_sc[...] = _q_columns(cfg, qc_ref, g)
        for jj in range(g):  # per-head lse / D rows -> columns of the stacked tile
            rs = slice(jj * bq, (jj + 1) * bq)
            lse = jnp.broadcast_to(lse_ref[jj], (NUM_LANES, bq)).T
            lse_sc[rs, :] = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # lse_safe: p = 0 on empty rows
            di_sc[rs, :] = jnp.broadcast_to(di_ref[jj], (NUM_LANES, bq)).T

    j, live = _step(steps_ref, row, t, nk)

    def chunk(c, off, masked: bool):
        sl = pl.ds(off, bkc)
        q = _load_stacked(q_ref, g)
        do = _load_stacked(do_ref, g)
        k = k_ref[sl, :]
        s, tanh = _cap(cfg, _nt(cfg, q, k) * cfg.scale)
        if masked:
            s = _mask_scores(cfg, s, qcol_sc[...], kc_ref[c], g, bq, bkc)
        p = jnp.exp(s - lse_sc[:, 0:1])
        ds = p * (_nt(cfg, do, v_ref[sl, :]) - di_sc[:, 0:1])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq_sc[...] += cfg.scale * _nn(cfg, ds.astype(k.dtype), k)

    pl.when(live)(lambda: _for_chunks(chunks_ref, (row * nk + j) * nc, nc, bkc, chunk))

    @pl.when(t == nk - 1)
    def _finish():
        _store_stacked(dq_ref, dq_sc[...])


def _dq_call(cfg: FlashConfig, q, k, v, do, lse, di, q_coords, steps, chunks, kv_coords):
    b, hkv, g, tp, d = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    tl = cfg.tiles
    bq, bkv, bkc = tl.block_q_bwd, tl.block_kv_bwd, tl.block_kv_compute_bwd
    nq, nk, nc = tp // bq, sp // bkv, bkv // bkc
    kv_map, kc_spec = _q_major_specs(cfg, hkv, nq, nk, nc, bkv, bkc, kv_coords.shape[-2])
    q_map = lambda b_, h_, i_, t_, *_: (b_, h_, 0, i_, 0)  # noqa: E731
    row_map = lambda b_, h_, i_, t_, *_: (b_, h_, 0, 0, i_)  # noqa: E731
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, g, bq, d), q_map),
        pl.BlockSpec((_SQ, _SQ, bkv, d), kv_map),
        pl.BlockSpec((_SQ, _SQ, bkv, dv), kv_map),
        pl.BlockSpec((_SQ, _SQ, g, bq, dv), q_map),
        pl.BlockSpec((_SQ, _SQ, g, 1, bq), row_map),
        pl.BlockSpec((_SQ, _SQ, g, 1, bq), row_map),
        _q_coord_spec(cfg, q_coords, g, bq, lambda b_, h_, i_, t_, *_: i_),
        kc_spec,
    ]
    scratch = [_vmem((g * bq, d), jnp.float32), _vmem((g * bq, NUM_LANES), jnp.float32),
               _vmem((g * bq, NUM_LANES), jnp.float32), _q_coord_scratch(cfg, q_coords, g, bq)]
    kernel = functools.partial(_dq_kernel, cfg=cfg, g=g, bq=bq, bkc=bkc, nq=nq, nk=nk, nc=nc, hkv=hkv)
    return pl.pallas_call(
        kernel,
        grid_spec=_PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(b, hkv, nq, nk),
                                          in_specs=in_specs,
                                          out_specs=pl.BlockSpec((_SQ, _SQ, g, bq, d), q_map),
                                          scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_CompilerParams(dimension_semantics=_parallel(3),
                                        vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, b * hkv * g * tp * sp, 2 * (2 * d + dv), 1,
                            2 * _nbytes(q) + _nbytes(do, lse, di, q_coords), _nbytes(k, v, kv_coords), nq),
        name="seqmix_flash_dq",
    )(steps, chunks, q, k, v, do, lse, di, q_coords, kv_coords)


# ----------------------------------------------------------------------------- dkv kernel


def _dkv_kernel(steps_ref, chunks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qc_ref,
                kc_ref, dk_ref, dv_ref, dk_sc, dv_sc, kcol_sc, *, cfg: FlashConfig, g: int,
                bq: int, bkc: int, nk: int, nq: int, nc: int, hkv: int):
    b, h, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    tab = _table(cfg, b, h, hkv)

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        for c in range(nc):  # (8, bkc) per chunk -> (bkv, 8): key coordinates as columns
            kcol_sc[c * bkc:(c + 1) * bkc, :] = _col(kc_ref[c])

    i, live = _step(steps_ref, tab * nk + j, t, nq)

    def chunk(c, off, masked: bool):
        # Transposed orientation: scores are (keys, queries), so per-query lse / D are rows.
        sl = pl.ds(off, bkc)
        k = k_ref[sl, :]
        v = v_ref[sl, :]
        kcol = kcol_sc[sl, :]
        shared = None  # one predicate for the group, unless it depends on the head
        if masked and not cfg.per_head:
            shared = _allowed_t(cfg, qc_ref[...], kcol, (bkc, bq))

        def head(hg, carry):  # the q heads of this kv head; dk/dv sum over the group
            dk, dv = carry
            q = q_ref[hg]
            do = do_ref[hg]
            lse = lse_ref[hg]  # (1, bq)
            s, tanh = _cap(cfg, _nt(cfg, k, q) * cfg.scale)  # (bkc, bq)
            if masked:
                ok = shared if shared is not None else _allowed_t(cfg, qc_ref[hg], kcol, (bkc, bq))
                s = jnp.where(ok, s, -jnp.inf)
            p = jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse))
            dv = dv + _nn(cfg, p.astype(do.dtype), do)
            ds = p * (_nt(cfg, v, do) - di_ref[hg])
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            return dk + cfg.scale * _nn(cfg, ds.astype(q.dtype), q), dv

        carry = (dk_sc[sl, :], dv_sc[sl, :])
        dk, dv = head(0, carry) if g == 1 else jax.lax.fori_loop(0, g, head, carry)
        dk_sc[sl, :] = dk
        dv_sc[sl, :] = dv

    pl.when(live)(lambda: _for_chunks(chunks_ref, ((tab * nq + i) * nk + j) * nc, nc, bkc, chunk))

    @pl.when(t == nq - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv_call(cfg: FlashConfig, q, k, v, do, lse, di, q_coords, steps, chunks, kv_coords):
    b, hkv, g, tp, d = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    tl = cfg.tiles
    bq, bkv, bkc = tl.block_q_bwd, tl.block_kv_bwd, tl.block_kv_compute_bwd
    nq, nk, nc = tp // bq, sp // bkv, bkv // bkc
    kcr = kv_coords.shape[-2]

    def q_block(b_, h_, j_, t_, steps_ref, *_):
        return _inner_block(cfg, steps_ref, hkv, nk, nq, b_, h_, j_, t_)

    q_map = lambda *a: (a[0], a[1], 0, q_block(*a), 0)  # noqa: E731
    row_map = lambda *a: (a[0], a[1], 0, 0, q_block(*a))  # noqa: E731
    kv_map = lambda b_, h_, j_, t_, *_: (b_, h_, j_, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((_SQ, _SQ, g, bq, d), q_map),
        pl.BlockSpec((_SQ, _SQ, bkv, d), kv_map),
        pl.BlockSpec((_SQ, _SQ, bkv, dv), kv_map),
        pl.BlockSpec((_SQ, _SQ, g, bq, dv), q_map),
        pl.BlockSpec((_SQ, _SQ, g, 1, bq), row_map),
        pl.BlockSpec((_SQ, _SQ, g, 1, bq), row_map),
        _q_coord_spec(cfg, q_coords, g, bq, q_block),
        pl.BlockSpec((_SQ, nc, kcr, bkc), lambda b_, h_, j_, t_, *_: (b_, j_, 0, 0)),
    ]
    out_specs = [pl.BlockSpec((_SQ, _SQ, bkv, d), kv_map), pl.BlockSpec((_SQ, _SQ, bkv, dv), kv_map)]
    scratch = [_vmem((bkv, d), jnp.float32), _vmem((bkv, dv), jnp.float32),
               _vmem((bkv, kcr), jnp.int32)]
    kernel = functools.partial(_dkv_kernel, cfg=cfg, g=g, bq=bq, bkc=bkc, nk=nk, nq=nq, nc=nc, hkv=hkv)
    return pl.pallas_call(
        kernel,
        grid_spec=_PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(b, hkv, nk, nq),
                                          in_specs=in_specs, out_specs=out_specs,
                                          scratch_shapes=scratch),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_CompilerParams(dimension_semantics=_parallel(3),
                                        vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=cfg.interpret,
        cost_estimate=_cost(cfg, b * hkv * g * tp * sp, 4 * (d + dv), 1,
                            2 * _nbytes(k, v) + _nbytes(kv_coords), _nbytes(q, do, lse, di, q_coords), nk),
        name="seqmix_flash_dkv",
    )(steps, chunks, q, k, v, do, lse, di, q_coords, kv_coords)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(cfg: FlashConfig, q, k, v, sinks, q_coords, fwd_meta, bwd_meta):
    """(o [B,Hkv,G,Tp,Dv], lse [B,Hkv,G,1,Tp]) in kernel layout (module docstring).

    ``fwd_meta = (steps [n·nq·nk], chunks [n·nq·nk·nc], kv_coords [B, nk·nc, R, bkc])`` for the
    forward tiles; ``bwd_meta = (dq_steps [n·nq·nk], dkv_steps [n·nk·nq], chunks, kv_coords)`` for the
    backward tiles (``n`` tables: 1, or ``B·Hkv`` with ``cfg.per_head``; kv coordinates are stored
    chunk-major so a kernel indexes a chunk on a leading axis).
    Differentiable in q, k, v and sinks.
    """
    return _fwd_call(cfg, q, k, v, sinks, q_coords, *fwd_meta)


def _vjp_fwd(cfg, q, k, v, sinks, q_coords, fwd_meta, bwd_meta):
    o, lse = _fwd_call(cfg, q, k, v, sinks, q_coords, *fwd_meta)
    return (o, lse), (q, k, v, sinks, q_coords, fwd_meta, bwd_meta, o, lse)


def _vjp_bwd(cfg, res, cts):
    q, k, v, sinks, q_coords, fwd_meta, bwd_meta, o, lse = res
    dq_steps, dkv_steps, chunks, kv_coords = bwd_meta
    do, dlse = cts
    b, hkv, g, tp, _ = q.shape
    do = do.astype(q.dtype)
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, :, None, :] - dlse
    dq = _dq_call(cfg, q, k, v, do, lse, delta, q_coords, dq_steps, chunks, kv_coords)
    dk, dv = _dkv_call(cfg, q, k, v, do, lse, delta, q_coords, dkv_steps, chunks, kv_coords)
    if cfg.has_sinks:  # plain jnp from the residuals: no kernel needed
        hq = hkv * g
        dsinks = sink_grad(sinks, lse.reshape(b, hq, tp), delta.reshape(b, hq, tp)).astype(sinks.dtype)
    else:
        dsinks = jnp.zeros_like(sinks)
    no_ct = lambda tree: jax.tree_util.tree_map(lambda _: None, tree)  # noqa: E731 - int inputs
    return dq, dk, dv, dsinks, None, no_ct(fwd_meta), no_ct(bwd_meta)


flash_attention.defvjp(_vjp_fwd, _vjp_bwd)


def default_interpret():
    """Interpret-mode setting for :class:`FlashConfig` on this backend (see ``pallas_kernels._target``)."""
    return _target.interpret_params()
