"""Block-sparse flash attention for NVIDIA Hopper (Pallas / Mosaic GPU): forward, dq and dkv kernels.

Algorithms: FAMILIES.md §3.1 (online softmax), §3.2 (block metadata), §3.3 (backward), §3.5 (GQA); the
same semantics as ``pallas_kernels.tpu.flash_attention`` (mask predicate evaluated in-kernel on PARTIAL
blocks, sinks, soft cap, fully masked rows give ``o = 0`` and ``lse = -inf``). Raw kernels plus their
``custom_vjp``; nothing from ``seqmix`` is imported. Written with ``plgpu.kernel`` (warp-specialized:
one producer warpgroup issues TMA copies into a ring of ``num_stages`` SMEM slots, one or two compute
warpgroups run ``wgmma`` and the softmax), not with ``pl.pallas_call`` grid BlockSpecs.

Kernel layout (the caller transposes from the API's ``[B, T, H, D]``; ``G = Hq / Hkv``, query head
``h`` reads kv head ``h // G``: K/V are never repeated in HBM):

* ``q [B, Hq, Tp, D]``, ``k [B, Hkv, Sp, D]``, ``v [B, Hkv, Sp, Dv]``, ``Tp``/``Sp`` multiples of
  ``block_q``/``block_kv`` (:func:`flash_attention` takes them so; the caller pads);
* ``o [B, Hq, Tp, Dv]`` (input dtype), ``lse [B, Hq, Tp]`` fp32 (natural log);
* coordinates, int32, rows ``(pos, rel, seg)``: ``q_coords [B, 3, Tp]``, ``kv_coords [B, 3, Sp]``: what
  a PARTIAL block needs to evaluate ``pair_fn(q, kv)`` (``q = (q_pos, q_rel, q_seg)`` and ``kv`` alike,
  ``(rows, keys)`` int32 tiles; returns bool: the TPU kernels' convention). A padded key must be rejected
  by the predicate (conventionally ``kv_pos = -1``);
* ``sinks [Hq]`` fp32 (ignored unless ``has_sinks``).

Inside, the kernels also read pre-transposed copies made by XLA (``kT [B, Hkv, D, Sp]``, ``vT``, ``qT``,
``doT``): every ``wgmma`` operand is then a plain row-major SMEM tile, so no ``transpose_ref`` is needed
(the Mosaic GPU interpreter of jax 0.10 cannot read transposed refs; on hardware the 16-bit ``wgmma``
reads MN-major B tiles natively). The extra HBM traffic is O(T·D) against O(T²·D) of compute.

Block metadata (splash style, one table for every batch row and head), int32 in GMEM, one set for the
forward's ``block_q × block_kv`` blocks (``fwd_meta``) and one for the backward's ``block_q_bwd ×
block_kv_bwd`` blocks (``bwd_meta``; SMEM per CTA differs, so do the best tiles):

* ``kinds [nq, nk]``: EMPTY(0) / PARTIAL(1) / FULL(2) per (q block, kv block), built by the caller
  (e.g. from per-block coordinate ranges, FAMILIES.md §3.2); :func:`make_meta` packs it into
* ``steps [nq, nk]`` entries ``(kv block << 2) | kind``, live blocks first in increasing order (EMPTY
  tail), ``counts [nq]`` live blocks per q block, and the transposed ``steps_t [nk, nq]``,
  ``counts_t [nk]`` for the dkv kernel (the packing of ``pallas_kernels.tpu.flash_attention``). A
  kernel loops over exactly ``counts`` live blocks: EMPTY blocks cost neither a copy nor a step.

Kernels (grid ``(outer blocks, heads, batch)``; each CTA = one outer block of one head):

* forward and dq: CTA = ``block_q`` query rows of one query head; compute warpgroup ``w`` owns rows
  ``[w·rq, (w+1)·rq)`` with ``rq = block_q / compute_wgs`` (a multiple of 64, the ``wgmma`` M); the
  producer streams the live kv blocks (``kT``, ``v`` / ``k``, ``vT``, kv coordinates);
* dkv: CTA = ``block_kv`` keys of one kv head, warpgroup ``w`` owns ``rk = block_kv / compute_wgs_dkv``
  keys; the producer streams the live q blocks of all ``G`` query heads of the group (``q``, ``qT``,
  ``do``, ``doT``, lse, D, q coordinates) and dK/dV sum over the group in ``wgmma`` accumulators.

Numerics: fp32 scores and accumulators; base-2 online softmax (``log2 e`` folded into the scores) with
the ``m_use`` guard; soft cap ``c·tanh(s/c)`` before masking; sink logits join the denominator at the
end; backward recomputes ``p = exp(s − lse_safe)`` with ``lse_safe = +inf`` where ``lse = −inf``,
``D = rowsum(dO∘O) − dlse`` and the sink gradient are plain jnp outside the kernels. P and dS are cast
to the input dtype and staged through SMEM for the second ``wgmma`` (the interpreter's ``wgmma`` reads
SMEM operands only). fp32 inputs run in the interpreter (exact fp32 products there); on hardware the
f32 (tf32) ``wgmma`` accepts K-major operands only, so fp32 is not a compile target of this kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _target
from pallas_kernels.softmax_math import sink_grad

try:  # Mosaic GPU needs absl; keep this module importable without it (``available()`` says why)
    from jax.experimental.pallas import mosaic_gpu as plgpu
except Exception:  # noqa: BLE001  pragma: no cover
    plgpu = None

# Same values and packing as pallas_kernels.tpu.flash_attention and seqmix.ops.masks (asserted by the
# tests); not imported from there because that module pulls in jax.experimental.pallas.tpu.
EMPTY, PARTIAL, FULL = 0, 1, 2
KIND_BITS = 2
KIND_MASK = (1 << KIND_BITS) - 1
COORD_ROWS = 3
POS, REL, SEG = 0, 1, 2
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_TMA_BOX = 256  # elements per dimension of one TMA copy
MAX_SMEM_BYTES = 232448  # H100 opt-in shared memory per block

PairFn = Callable[..., Any]


# ----------------------------------------------------------------------------- jax version drift


def interpret_params(detect_races: bool = False, **kwargs):
    """``InterpretGPUParams`` (public as ``plgpu.InterpretGPUParams`` on jax >= 0.11; private on 0.10)."""
    return _target.gpu_interpreter(detect_races=detect_races, **kwargs)


def reset_interpreter():
    """Reset the Mosaic GPU interpreter's global state (needed after a kernel raised in it)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    except ImportError:  # pragma: no cover
        return
    ipc.reset_gpu_interpret_mode_state()


def _kernel(body, out, scratch, *, name: str, **kw):
    """``plgpu.kernel`` with ``out_type``/``scratch_types`` (``out_shape``/``scratch_shapes`` before); the
    kernel is called ``name`` (Mosaic GPU names it after the body: compile reports tell kernels apart)."""
    body.__name__ = body.__qualname__ = name
    params = inspect.signature(plgpu.kernel).parameters
    if "out_type" in params:
        return plgpu.kernel(body, out_type=out, scratch_types=scratch, **kw)
    return plgpu.kernel(body, out_shape=out, scratch_shapes=scratch, **kw)  # pragma: no cover


def load(ref, layout):
    """``plgpu.load`` of a whole SMEM ref in ``layout`` (it took an index tuple before jax 0.12)."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


class _Lane:
    """Register-layout operations that the Mosaic GPU interpreter cannot run (``plgpu.load`` with a layout,
    ``layout_cast``): with ``interpret`` they become plain loads / no-ops, the layout being irrelevant."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def vec(self, ref, axis: int):
        """A 1-D SMEM row as the vector that broadcasts along ``axis`` of a WGMMA tile
        (axis 1: one value per tile row, ``WGMMA.reduce(1)``; axis 0: one per column)."""
        if self.interpret:
            return ref[...]
        return load(ref, plgpu.Layout.WGMMA.reduce(axis))

    def full(self, shape, value, dtype=jnp.float32):
        x = jnp.full(shape, value, dtype)
        if self.interpret:
            return x
        layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
        return plgpu.layout_cast(x, layout)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    """Tile sizes.

    Forward: CTAs of ``block_q`` query rows split over ``compute_wgs`` warpgroups (``block_q /
    compute_wgs`` a multiple of 64, the ``wgmma`` M), ``block_kv`` keys per pipeline step, a TMA ring of
    ``num_stages`` slots. Backward (its own ``block_q_bwd × block_kv_bwd`` metadata): the dq kernel splits
    ``block_q_bwd`` rows over ``compute_wgs_dq`` warpgroups and steps over ``block_kv_bwd`` keys; the dkv
    kernel splits ``block_kv_bwd`` keys over ``compute_wgs_dkv`` warpgroups and steps over
    ``block_q_bwd`` queries; both with ``num_stages_bwd`` slots.
    """

    block_q: int = 128
    block_kv: int = 128
    compute_wgs: int = 2
    num_stages: int = 2
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    compute_wgs_dq: int = 1
    compute_wgs_dkv: int = 1
    num_stages_bwd: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 64 or val % 64 or val > MAX_TMA_BOX:
                raise ValueError(f"FlashTiles.{name} must be a multiple of 64 in [64, 256]; got {val!r}")
        for rows, wgs in ((self.block_q, self.compute_wgs), (self.block_q_bwd, self.compute_wgs_dq),
                          (self.block_kv_bwd, self.compute_wgs_dkv)):
            if wgs not in (1, 2) or (rows // wgs) % 64:
                raise ValueError(f"compute warpgroups must be 1 or 2, each with a multiple of 64 rows: {self}")
        if self.num_stages < 1 or self.num_stages_bwd < 1:
            raise ValueError(f"num_stages must be >= 1: {self}")


#: H100, D = Dv = 128, bf16 (SMEM: fwd 197 KiB, dq 139 KiB, dkv 179 KiB of 227 KiB; see smem_bytes).
H100_TILES = FlashTiles()
#: The smallest legal tiles, one compute warpgroup everywhere: for the interpreter tests.
INTERPRET_TILES = FlashTiles(block_q=64, block_kv=64, compute_wgs=1, num_stages=2, block_q_bwd=64,
                             block_kv_bwd=64, compute_wgs_dq=1, compute_wgs_dkv=1, num_stages_bwd=2)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static settings of one attention call (hashable; a ``custom_vjp`` non-differentiable arg)."""

    scale: float
    pair_fn: PairFn  # which (query, key) pairs of a PARTIAL block are allowed
    soft_cap: float | None = None
    has_sinks: bool = False
    tiles: FlashTiles = H100_TILES
    interpret: Any = None  # None: compile with Mosaic GPU; else InterpretGPUParams (see interpret_params)
    approx_math: bool = True  # hardware only: fast exp2 / log / division


class FlashMeta(NamedTuple):
    """Packed block metadata (module docstring): int32 arrays, traced or concrete."""

    steps: Any  # [nq, nk]
    counts: Any  # [nq]
    steps_t: Any  # [nk, nq]
    counts_t: Any  # [nk]


def step_entry(block, kind):
    """Pack a metadata entry (the TPU module's packing)."""
    return (block << KIND_BITS) | kind


def _pack_rows(kinds):
    """kinds [n_outer, n_inner] -> (steps, counts): live inner blocks first, in increasing order."""
    kinds = jnp.asarray(kinds, jnp.int32)
    n_inner = kinds.shape[1]
    idx = jnp.broadcast_to(jnp.arange(n_inner, dtype=jnp.int32), kinds.shape)
    live = kinds != EMPTY
    order = jnp.argsort(jnp.where(live, idx, n_inner + idx), axis=1, stable=True).astype(jnp.int32)
    steps = step_entry(order, jnp.take_along_axis(kinds, order, axis=1))
    return steps.astype(jnp.int32), live.sum(axis=1).astype(jnp.int32)


def make_meta(kinds) -> FlashMeta:
    """Pack a ``kinds [nq, nk]`` table (EMPTY/PARTIAL/FULL per block pair) for all three kernels."""
    kinds = jnp.asarray(kinds, jnp.int32)
    steps, counts = _pack_rows(kinds)
    steps_t, counts_t = _pack_rows(kinds.T)
    return FlashMeta(steps, counts, steps_t, counts_t)


def _mma_transforms(dtype):
    """SMEM transforms of a ``wgmma`` operand: 128-byte swizzle, (8, 128 / itemsize) tiles."""
    itemsize = jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128))


def _smem(shape, dtype, mma: bool = False):
    return plgpu.SMEM(shape, dtype, transforms=_mma_transforms(dtype) if mma else ())


def _compiler_params(cfg: FlashConfig):
    return None if cfg.interpret is not None else plgpu.CompilerParams(approx_math=cfg.approx_math)


def _matmul(shape, a_ref, b_ref):
    """``a @ b`` (SMEM refs, row-major) as a fresh fp32 WGMMA accumulator value."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _bcast(vec, shape, axis: int):
    """Broadcast a vector along ``axis`` of a 2-D tile (axis 1: per-row values)."""
    return lax.broadcast_in_dim(vec, shape, [1 - axis])


def _scores(cfg: FlashConfig, s):
    """Scaled, soft-capped scores in log2 units, and tanh (None without a cap)."""
    if cfg.soft_cap is None:
        return s * (cfg.scale * LOG2E), None
    t = jnp.tanh(s * (cfg.scale / cfg.soft_cap))
    return t * (cfg.soft_cap * LOG2E), t


def _mask(cfg: FlashConfig, lane: _Lane, s, kind, rows_ref, cols_ref, transposed: bool):
    """``where(pair_fn(...), s, -inf)`` on PARTIAL blocks (a ``cond``: FULL blocks skip the predicate).

    ``rows_ref`` / ``cols_ref``: SMEM coordinates ``[COORD_ROWS, n]`` (pos, rel, seg) of the tile's rows /
    columns, loaded inside the masked branch only, so that no step holds them in registers outside it (a
    column vector takes 16 registers a thread; the dkv kernel's main loop spilled without this). Queries
    are the rows unless ``transposed`` (the dkv kernel's key-major tiles)."""

    def masked(s):
        rows = [_bcast(c, s.shape, 1) for c in _coords(lane, rows_ref, 1)]
        cols = [_bcast(c, s.shape, 0) for c in _coords(lane, cols_ref, 0)]
        qc, kc = (cols, rows) if transposed else (rows, cols)
        ok = cfg.pair_fn(tuple(qc), tuple(kc))
        return jnp.where(ok, s, -jnp.inf)

    return lax.cond(kind == PARTIAL, masked, lambda s: s, s)


def _drain(used_bar, n, ns: int):
    """The producer waits for the release of the last ``ns`` slots it filled: it then has observed every
    phase of ``used_bar`` (the interpreter requires a thread that waits on a barrier to see all its
    phases; on hardware this only keeps the producer alive until the consumers are done)."""

    def wait(t, carry):
        plgpu.barrier_wait(used_bar.at[lax.rem(t, ns)])
        return carry

    lax.fori_loop(jnp.maximum(n - ns, 0), n, wait, 0)


def _produce(steps_row, n, block: int, nwg: int, ns: int, full_bar, used_bar, copies):
    """The producer warpgroup of the forward and dq kernels: for each of the ``n`` live steps of
    ``steps_row`` (packed entries), wait until the consumers released its ring slot, then TMA-copy each
    ``(src, ring)`` of ``copies`` (``src(block slice)`` a GMEM ref) into the slot; then drain."""
    if nwg == 2:
        plgpu.set_max_registers(40, action="decrease")

    def issue(t, carry):
        slot = lax.rem(t, ns)
        j = steps_row[t] >> KIND_BITS
        sl = pl.ds(pl.multiple_of(j * block, block), block)
        pl.when(t >= ns)(lambda: plgpu.barrier_wait(used_bar.at[slot]))
        for src, ring in copies:
            plgpu.copy_gmem_to_smem(src(sl), ring.at[slot], full_bar.at[slot])
        return carry

    lax.fori_loop(0, n, issue, 0)
    _drain(used_bar, n, ns)


def _coords(lane: _Lane, ref, axis: int):
    return [lane.vec(ref.at[r], axis) for r in range(COORD_ROWS)]


# ----------------------------------------------------------------------------- forward kernel


def _fwd_call(cfg: FlashConfig, q, k, v, sinks, q_coords, kv_coords, steps, counts):
    b, hq, tp, d = q.shape
    hkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    tl = cfg.tiles
    bq, bkv, nwg, ns = tl.block_q, tl.block_kv, tl.compute_wgs, tl.num_stages
    rq = bq // nwg
    nq = tp // bq
    dt = q.dtype
    lane = _Lane(cfg.interpret is not None)
    kt = jnp.swapaxes(k, 2, 3)  # [B, Hkv, D, Sp]

    def body(steps_ref, counts_ref, sinks_ref, q_ref, kt_ref, v_ref, qc_ref, kc_ref, o_ref, lse_ref,
             q_s, qc_s, p_s, o_s, lse_s, kt_s, v_s, kc_s, q_bar, full_bar, used_bar):
        qi, h, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        hk = h // g
        n = counts_ref[qi]

        pl.when(wg == nwg)(lambda: _produce(steps_ref.at[qi], n, bkv, nwg, ns, full_bar, used_bar, [
            (lambda kv: kt_ref.at[bi, hk, :, kv], kt_s), (lambda kv: v_ref.at[bi, hk, kv, :], v_s),
            (lambda kv: kc_ref.at[bi, :, kv], kc_s)]))

        @pl.when(wg < nwg)
        def _consumer():
            if nwg == 2:
                plgpu.set_max_registers(232, action="increase")
            r0 = pl.multiple_of(qi * bq + wg * rq, rq)
            rows = pl.ds(r0, rq)
            qs, qcs, ps, lses = q_s.at[wg], qc_s.at[wg], p_s.at[wg], lse_s.at[wg]
            os_ = qs if o_s is None else o_s.at[wg]  # o reuses q's SMEM when D == Dv
            plgpu.copy_gmem_to_smem(q_ref.at[bi, h, rows, :], qs, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(qc_ref.at[bi, :, rows], qcs, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            def step(t, carry):
                acc, m, l = carry
                slot = lax.rem(t, ns)
                kind = steps_ref[qi, t] & KIND_MASK
                plgpu.barrier_wait(full_bar.at[slot])
                s, _ = _scores(cfg, _matmul((rq, bkv), qs, kt_s.at[slot]))
                s = _mask(cfg, lane, s, kind, qcs, kc_s.at[slot], False)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no exp(-inf - (-inf))
                corr = jnp.exp2(m - m_use)
                p = jnp.exp2(s - _bcast(m_use, s.shape, 1))
                l = l * corr + p.sum(axis=1)
                ps[...] = p.astype(dt)
                plgpu.commit_smem()  # generic-proxy stores -> visible to wgmma's async proxy
                pv = _matmul((rq, dv), ps, v_s.at[slot])
                plgpu.barrier_arrive(used_bar.at[slot])
                return acc * _bcast(corr, acc.shape, 1) + pv, m_new, l

            init = (lane.full((rq, dv), 0.0), lane.full((rq,), -jnp.inf), lane.full((rq,), 0.0))
            acc, m, l = lax.fori_loop(0, n, step, init)
            if cfg.has_sinks:  # b_h joins the denominator only
                bias = sinks_ref[h] * LOG2E
                m2 = jnp.maximum(m, bias)
                m2_use = jnp.where(m2 == -jnp.inf, 0.0, m2)
                corr = jnp.exp2(m - m2_use)
                l = l * corr + jnp.exp2(bias - m2_use)
                acc = acc * _bcast(corr, acc.shape, 1)
                m = m2
            ok = l != 0.0  # only rows with no allowed key (and no sink) have l == 0
            l_safe = jnp.where(ok, l, 1.0)
            os_[...] = jnp.where(_bcast(ok, acc.shape, 1), acc / _bcast(l_safe, acc.shape, 1), 0.0).astype(dt)
            lses[...] = jnp.where(ok, m * LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(os_, o_ref.at[bi, h, rows, :])
            plgpu.copy_smem_to_gmem(lses, lse_ref.at[bi, h, rows])
            plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((nwg, rq, d), dt, mma=True),  # q
        _smem((nwg, COORD_ROWS, rq), jnp.int32),  # q coordinates
        _smem((nwg, rq, bkv), dt, mma=True),  # p
        None if d == dv else _smem((nwg, rq, dv), dt, mma=True),  # o (else in q's buffer)
        _smem((nwg, rq), jnp.float32),  # lse
        _smem((ns, d, bkv), dt, mma=True),  # kT ring
        _smem((ns, bkv, dv), dt, mma=True),  # v ring
        _smem((ns, COORD_ROWS, bkv), jnp.int32),  # kv coordinates ring
        plgpu.Barrier(num_arrivals=2, num_barriers=nwg),
        plgpu.Barrier(num_arrivals=3, num_barriers=ns),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    ]
    out = [jax.ShapeDtypeStruct((b, hq, tp, dv), dt), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)]
    return _kernel(body, out, scratch, name="seqmix_flash_fwd", grid=(nq, hq, b), grid_names=("q", "h", "b"),
                   num_threads=nwg + 1, thread_name="wg", compiler_params=_compiler_params(cfg),
                   interpret=cfg.interpret)(steps, counts, sinks, q, kt, v, q_coords, kv_coords)


# ----------------------------------------------------------------------------- dq kernel


def _dq_call(cfg: FlashConfig, q, k, v, do, lse, delta, q_coords, kv_coords, steps, counts):
    b, hq, tp, d = q.shape
    hkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    tl = cfg.tiles
    bq, bkv, nwg, ns = tl.block_q_bwd, tl.block_kv_bwd, tl.compute_wgs_dq, tl.num_stages_bwd
    rq = bq // nwg
    nq = tp // bq
    dt = q.dtype
    lane = _Lane(cfg.interpret is not None)
    kt, vt = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)

    def body(steps_ref, counts_ref, q_ref, do_ref, lse_ref, di_ref, qc_ref, k_ref, kt_ref, vt_ref,
             kc_ref, dq_ref, q_s, do_s, lse_s, di_s, qc_s, ds_s, k_s, kt_s, vt_s, kc_s, q_bar, full_bar,
             used_bar):
        qi, h, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        hk = h // g
        n = counts_ref[qi]

        pl.when(wg == nwg)(lambda: _produce(steps_ref.at[qi], n, bkv, nwg, ns, full_bar, used_bar, [
            (lambda kv: k_ref.at[bi, hk, kv, :], k_s), (lambda kv: kt_ref.at[bi, hk, :, kv], kt_s),
            (lambda kv: vt_ref.at[bi, hk, :, kv], vt_s), (lambda kv: kc_ref.at[bi, :, kv], kc_s)]))

        @pl.when(wg < nwg)
        def _consumer():
            if nwg == 2:
                plgpu.set_max_registers(232, action="increase")
            r0 = pl.multiple_of(qi * bq + wg * rq, rq)
            rows = pl.ds(r0, rq)
            qs, dos, dss = q_s.at[wg], do_s.at[wg], ds_s.at[wg]
            bar = q_bar.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, h, rows, :], qs, bar)
            plgpu.copy_gmem_to_smem(do_ref.at[bi, h, rows, :], dos, bar)
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, rows], lse_s.at[wg], bar)
            plgpu.copy_gmem_to_smem(di_ref.at[bi, h, rows], di_s.at[wg], bar)
            plgpu.copy_gmem_to_smem(qc_ref.at[bi, :, rows], qc_s.at[wg], bar)
            plgpu.barrier_wait(bar)
            lse = lane.vec(lse_s.at[wg], 1)
            lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse) * LOG2E  # lse_safe: p = 0 on empty rows
            di = lane.vec(di_s.at[wg], 1)

            def scope(dq_acc):
                def step(t, _):
                    slot = lax.rem(t, ns)
                    kind = steps_ref[qi, t] & KIND_MASK
                    plgpu.barrier_wait(full_bar.at[slot])
                    s, tanh = _scores(cfg, _matmul((rq, bkv), qs, kt_s.at[slot]))
                    s = _mask(cfg, lane, s, kind, qc_s.at[wg], kc_s.at[slot], False)
                    p = jnp.exp2(s - _bcast(lse2, s.shape, 1))
                    dp = _matmul((rq, bkv), dos, vt_s.at[slot])
                    ds = p * (dp - _bcast(di, dp.shape, 1))
                    if tanh is not None:
                        ds = ds * (1.0 - tanh * tanh)
                    dss[...] = ds.astype(dt)
                    plgpu.commit_smem()
                    plgpu.wgmma(dq_acc, dss, k_s.at[slot])
                    plgpu.wgmma_wait(0)  # k_s[slot] and ds are read before the slot is released
                    plgpu.barrier_arrive(used_bar.at[slot])
                    return _

                lax.fori_loop(0, n, step, 0)
                return dq_acc[...]

            dq = pl.run_scoped(scope, plgpu.ACC((rq, d), jnp.float32))
            qs[...] = (dq * cfg.scale).astype(dt)  # q no longer needed: reuse its SMEM
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, h, rows, :])
            plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((nwg, rq, d), dt, mma=True),  # q (then dq)
        _smem((nwg, rq, dv), dt, mma=True),  # do
        _smem((nwg, rq), jnp.float32),  # lse
        _smem((nwg, rq), jnp.float32),  # D
        _smem((nwg, COORD_ROWS, rq), jnp.int32),  # q coordinates
        _smem((nwg, rq, bkv), dt, mma=True),  # ds
        _smem((ns, bkv, d), dt, mma=True),  # k ring
        _smem((ns, d, bkv), dt, mma=True),  # kT ring
        _smem((ns, dv, bkv), dt, mma=True),  # vT ring
        _smem((ns, COORD_ROWS, bkv), jnp.int32),  # kv coordinates ring
        plgpu.Barrier(num_arrivals=5, num_barriers=nwg),
        plgpu.Barrier(num_arrivals=4, num_barriers=ns),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    ]
    return _kernel(body, jax.ShapeDtypeStruct(q.shape, dt), scratch, name="seqmix_flash_dq", grid=(nq, hq, b),
                   grid_names=("q", "h", "b"), num_threads=nwg + 1, thread_name="wg",
                   compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        steps, counts, q, do, lse, delta, q_coords, k, kt, vt, kv_coords)


# ----------------------------------------------------------------------------- dkv kernel


def _group_steps(steps, counts, g: int):
    """``[nk, m]`` step entries with ``counts [nk]`` live ones -> ``[nk, g·m]`` entries, query-head offsets
    (int32) and ``g · counts`` live steps, for the steps of G heads in a row: step u is head ``u // n``,
    entry ``u mod n`` (n = counts)."""
    if g == 1:
        return steps, jnp.zeros_like(steps), counts
    u = jnp.arange(g * steps.shape[1], dtype=jnp.int32)[None, :]
    n = jnp.maximum(counts, 1)[:, None]
    return jnp.take_along_axis(steps, u % n, axis=1), (u // n).astype(jnp.int32), counts * g


def _dkv_call(cfg: FlashConfig, q, k, v, do, lse, delta, q_coords, kv_coords, steps_t, counts_t):
    b, hq, tp, d = q.shape
    hkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    tl = cfg.tiles
    bq, bkv, nwg, ns = tl.block_q_bwd, tl.block_kv_bwd, tl.compute_wgs_dkv, tl.num_stages_bwd
    rk = bkv // nwg
    nk = sp // bkv
    dt = q.dtype
    lane = _Lane(cfg.interpret is not None)
    qt, dot = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)

    # The G heads' steps laid out flat (step u: head u // n, block entry u mod n), so the kernel indexes
    # instead of dividing by the dynamic n; lse comes pre-scaled to log2 units with empty rows at +inf.
    steps_t, heads_t, counts_t = _group_steps(steps_t, counts_t, g)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse) * LOG2E

    def body(steps_ref, heads_ref, counts_ref, k_ref, v_ref, kc_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref,
             di_ref, qc_ref, dk_ref, dv_ref, k_s, v_s, kc_s, pt_s, dst_s, q_s, qt_s, do_s, dot_s, lse_s,
             di_s, qc_s, kv_bar, full_bar, used_bar):
        kj, hk, bi = lax.axis_index("kv"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        n = counts_ref[kj]  # live steps over the G heads

        def head_block(u):
            """Step u -> (query head, q block, kind): the G heads of the group, live q blocks inner."""
            entry = steps_ref[kj, u]
            h = hk if g == 1 else hk * g + heads_ref[kj, u]  # MHA: no table read (it cost registers)
            return h, entry >> KIND_BITS, entry & KIND_MASK

        @pl.when(wg == nwg)
        def _producer():
            if nwg == 2:
                plgpu.set_max_registers(40, action="decrease")

            def issue(u, _):
                slot = lax.rem(u, ns)
                h, i, _kind = head_block(u)
                qb = pl.ds(pl.multiple_of(i * bq, bq), bq)
                pl.when(u >= ns)(lambda: plgpu.barrier_wait(used_bar.at[slot]))
                bar = full_bar.at[slot]
                plgpu.copy_gmem_to_smem(q_ref.at[bi, h, qb, :], q_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(qt_ref.at[bi, h, :, qb], qt_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(do_ref.at[bi, h, qb, :], do_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(dot_ref.at[bi, h, :, qb], dot_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, h, qb], lse_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(di_ref.at[bi, h, qb], di_s.at[slot], bar)
                plgpu.copy_gmem_to_smem(qc_ref.at[bi, :, qb], qc_s.at[slot], bar)
                return _

            lax.fori_loop(0, n, issue, 0)
            _drain(used_bar, n, ns)

        @pl.when(wg < nwg)
        def _consumer():
            if nwg == 2:
                plgpu.set_max_registers(232, action="increase")
            c0 = pl.multiple_of(kj * bkv + wg * rk, rk)
            keys = pl.ds(c0, rk)
            ks, vs, pts, dsts = k_s.at[wg], v_s.at[wg], pt_s.at[wg], dst_s.at[wg]
            bar = kv_bar.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[bi, hk, keys, :], ks, bar)
            plgpu.copy_gmem_to_smem(v_ref.at[bi, hk, keys, :], vs, bar)
            plgpu.copy_gmem_to_smem(kc_ref.at[bi, :, keys], kc_s.at[wg], bar)
            plgpu.barrier_wait(bar)

            def scope(accs):
                dk_acc, dv_acc = accs

                def step(u, _):
                    slot = lax.rem(u, ns)
                    kind = steps_ref[kj, u] & KIND_MASK
                    plgpu.barrier_wait(full_bar.at[slot])
                    st, tanh = _scores(cfg, _matmul((rk, bq), ks, qt_s.at[slot]))  # (keys, queries)
                    st = _mask(cfg, lane, st, kind, kc_s.at[wg], qc_s.at[slot], True)  # keys: the rows
                    pt = jnp.exp2(st - _bcast(lane.vec(lse_s.at[slot], 0), st.shape, 0))
                    dpt = _matmul((rk, bq), vs, dot_s.at[slot])
                    dst = pt * (dpt - _bcast(lane.vec(di_s.at[slot], 0), dpt.shape, 0))
                    if tanh is not None:
                        dst = dst * (1.0 - tanh * tanh)
                    pts[...] = pt.astype(dt)
                    dsts[...] = dst.astype(dt)
                    plgpu.commit_smem()
                    plgpu.wgmma(dv_acc, pts, do_s.at[slot])
                    plgpu.wgmma(dk_acc, dsts, q_s.at[slot])
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(used_bar.at[slot])
                    return _

                lax.fori_loop(0, n, step, 0)
                return dk_acc[...], dv_acc[...]

            dk, dv_ = pl.run_scoped(scope, (plgpu.ACC((rk, d), jnp.float32), plgpu.ACC((rk, dv), jnp.float32)))
            ks[...] = (dk * cfg.scale).astype(dt)  # k / v no longer needed: reuse their SMEM
            vs[...] = dv_.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ks, dk_ref.at[bi, hk, keys, :])
            plgpu.copy_smem_to_gmem(vs, dv_ref.at[bi, hk, keys, :])
            plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((nwg, rk, d), dt, mma=True),  # k (then dk)
        _smem((nwg, rk, dv), dt, mma=True),  # v (then dv)
        _smem((nwg, COORD_ROWS, rk), jnp.int32),  # kv coordinates
        _smem((nwg, rk, bq), dt, mma=True),  # pT
        _smem((nwg, rk, bq), dt, mma=True),  # dsT
        _smem((ns, bq, d), dt, mma=True),  # q ring
        _smem((ns, d, bq), dt, mma=True),  # qT ring
        _smem((ns, bq, dv), dt, mma=True),  # do ring
        _smem((ns, dv, bq), dt, mma=True),  # doT ring
        _smem((ns, bq), jnp.float32),  # lse ring
        _smem((ns, bq), jnp.float32),  # D ring
        _smem((ns, COORD_ROWS, bq), jnp.int32),  # q coordinates ring
        plgpu.Barrier(num_arrivals=3, num_barriers=nwg),
        plgpu.Barrier(num_arrivals=7, num_barriers=ns),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=ns),
    ]
    out = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    return _kernel(body, out, scratch, name="seqmix_flash_dkv", grid=(nk, hkv, b), grid_names=("kv", "h", "b"),
                   num_threads=nwg + 1, thread_name="wg", compiler_params=_compiler_params(cfg),
                   interpret=cfg.interpret)(
        steps_t, heads_t, counts_t, k, v, kv_coords, q, qt, do, dot, lse, delta, q_coords)


# ----------------------------------------------------------------------------- custom_vjp


def _check(cfg: FlashConfig, q, k, v, sinks, q_coords, kv_coords, fwd_meta: FlashMeta,
           bwd_meta: FlashMeta):
    b, hq, tp, d = q.shape
    _, hkv, sp, dk = k.shape
    tl = cfg.tiles
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or dk != d or hq % hkv:
        raise ValueError(f"bad shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if tp % tl.block_q or tp % tl.block_q_bwd or sp % tl.block_kv or sp % tl.block_kv_bwd:
        raise ValueError(f"Tp={tp} / Sp={sp} must be multiples of the q / kv blocks of {tl}; pad first")
    for name, dim in (("D", d), ("Dv", v.shape[-1])):
        if dim % 64 or dim > MAX_TMA_BOX:
            raise ValueError(f"{name}={dim} must be a multiple of 64 and <= {MAX_TMA_BOX}")
    if q_coords.shape != (b, COORD_ROWS, tp) or kv_coords.shape != (b, COORD_ROWS, sp):
        raise ValueError(f"coordinates must be [B, 3, T]: {q_coords.shape}, {kv_coords.shape}")
    if sinks.shape != (hq,):
        raise ValueError(f"sinks must be [Hq]; got {sinks.shape}")
    for name, meta, bq, bkv in (("fwd_meta", fwd_meta, tl.block_q, tl.block_kv),
                                ("bwd_meta", bwd_meta, tl.block_q_bwd, tl.block_kv_bwd)):
        nq, nk = tp // bq, sp // bkv
        want = ((nq, nk), (nq,), (nk, nq), (nk,))
        if tuple(tuple(x.shape) for x in meta) != want:
            raise ValueError(f"{name} shapes {[x.shape for x in meta]} != {want} ({bq}x{bkv} blocks)")


def smem_bytes(tiles: FlashTiles, d: int, dv: int, dtype) -> dict[str, int]:
    """SMEM each kernel allocates (buffers only; barriers add a few bytes), to check against
    ``MAX_SMEM_BYTES`` (Mosaic GPU's lowering rejects more)."""
    it = jnp.dtype(dtype).itemsize
    c = 4 * COORD_ROWS
    bq, bkv, ns = tiles.block_q, tiles.block_kv, tiles.num_stages
    fwd = bq * (d + bkv + (dv if dv != d else 0)) * it + bq * (4 + c) + ns * bkv * ((d + dv) * it + c)
    bq, bkv, ns = tiles.block_q_bwd, tiles.block_kv_bwd, tiles.num_stages_bwd
    dq = bq * (d + dv + bkv) * it + bq * (8 + c) + ns * bkv * ((2 * d + dv) * it + c)
    dkv = bkv * (d + dv + 2 * bq) * it + bkv * c + ns * bq * (2 * (d + dv) * it + 8 + c)
    return {"fwd": fwd, "dq": dq, "dkv": dkv}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(cfg: FlashConfig, q, k, v, sinks, q_coords, kv_coords, fwd_meta: FlashMeta,
                    bwd_meta: FlashMeta):
    """(o [B, Hq, Tp, Dv], lse [B, Hq, Tp] fp32) in kernel layout (module docstring).

    ``fwd_meta`` / ``bwd_meta``: :func:`make_meta` of the kinds tables for the ``block_q × block_kv``
    and ``block_q_bwd × block_kv_bwd`` blocks of ``cfg.tiles`` (the same object when they coincide).
    Differentiable in q, k, v and sinks.
    """
    _check(cfg, q, k, v, sinks, q_coords, kv_coords, fwd_meta, bwd_meta)
    return _fwd_call(cfg, q, k, v, sinks, q_coords, kv_coords, fwd_meta.steps, fwd_meta.counts)


def _vjp_fwd(cfg, q, k, v, sinks, q_coords, kv_coords, fwd_meta, bwd_meta):
    _check(cfg, q, k, v, sinks, q_coords, kv_coords, fwd_meta, bwd_meta)
    o, lse = _fwd_call(cfg, q, k, v, sinks, q_coords, kv_coords, fwd_meta.steps, fwd_meta.counts)
    return (o, lse), (q, k, v, sinks, q_coords, kv_coords, fwd_meta, bwd_meta, o, lse)


def _vjp_bwd(cfg, res, cts):
    q, k, v, sinks, q_coords, kv_coords, fwd_meta, meta, o, lse = res
    do, dlse = cts
    do = do.astype(q.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse
    dq = _dq_call(cfg, q, k, v, do, lse, delta, q_coords, kv_coords, meta.steps, meta.counts)
    dk, dv = _dkv_call(cfg, q, k, v, do, lse, delta, q_coords, kv_coords, meta.steps_t, meta.counts_t)
    if cfg.has_sinks:  # plain jnp from the residuals: no kernel needed
        dsinks = sink_grad(sinks, lse, delta).astype(sinks.dtype)
    else:
        dsinks = jnp.zeros_like(sinks)
    none = lambda tree: jax.tree_util.tree_map(lambda _: None, tree)  # noqa: E731 - int inputs
    return dq, dk, dv, dsinks, None, None, none(fwd_meta), none(meta)


flash_attention.defvjp(_vjp_fwd, _vjp_bwd)
