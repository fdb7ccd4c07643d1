"""Chunked gated linear attention for NVIDIA Hopper (Pallas / Mosaic GPU): forward and backward kernels.

The recurrence of FAMILIES.md §2.4–§2.6 (the same semantics as ``pallas_kernels.tpu.gated_linear``)

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

with a scalar log gate per head and token (``simple_gla``); no decay (``linear_attention``: g = 0) and a
constant per-head decay (``retention``: g broadcast, ``gate_grad=False``) are the same kernel. Per-channel
decay (``gla``, ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``) runs the same kernels on anchored operands (see
"Per-channel gates" below). Raw kernels plus their ``custom_vjp``; nothing from ``seqmix`` is imported.
Written with ``plgpu.kernel`` (TMA copies + ``plgpu.Barrier`` + ``wgmma``), not with ``pl.pallas_call`` grid BlockSpecs.

Kernel layout (built by :func:`gated_linear_attention` from the API's ``[B, T, H, D]``, zero padded to
``Tp = N·C`` tokens, C = ``tiles.chunk``):

* ``q, k [B, H, Tp, Dk]``, ``v [B, H, Tp, Dv]`` (one dtype: the ``wgmma`` operand dtype), and the
  XLA-transposed copies ``qT, kT [B, H, Dk, Tp]``, ``vT [B, H, Dv, Tp]`` (every ``wgmma`` operand is a
  plain row-major SMEM tile: the Mosaic GPU interpreter of jax 0.10 cannot read transposed refs);
* ``tok [B, H, 5, Tp]`` fp32 per-token rows, computed in plain jnp by :func:`chunk_lanes`:
  ``G`` (chunk-local inclusive cumsum of the clamped log gate), ``start`` (index inside the chunk of
  the token's document's first token there, 0 if it began earlier), ``pos`` (index inside the chunk), ``wq = exp(G)`` before the chunk's first reset (else 0),
  ``wk = exp(G_C − G)`` after its last reset (else 0);
* ``decay [B, H, N, Dk]`` fp32: ``a = exp(G_C)`` if the chunk has no reset (else 0), per state row;
* ``h0 [B, H, Dk, Dv]`` fp32 initial state; outputs ``o [B, H, Tp, Dv]`` (``out_dtype``),
  ``final_state [B, H, Dk, Dv]`` fp32 and, for the backward, the chunk-start states
  ``states [B, H, N, Dk, Dv]`` in the input dtype (the backward only uses them as ``wgmma`` operands).

Grid ``(Dv / block_dv, H, B)``, one warpgroup per CTA; a sequential ``fori_loop`` over the N chunks
carries the fp32 state tile ``S [Dk, block_dv]`` in registers. Per chunk (``Γ_ij = exp(G_i − G_j)`` for
``i ≥ j`` in the same segment, masked in log space before ``exp``):

    O = scale · (wq ⊙_rows (Q S) + ((Q Kᵀ) ⊙ Γ) V),      S ← a ⊙_rows S + Kᵀ (wk ⊙_rows V)

(the row factors commute out of the matmuls, so only ``P`` and ``wk ⊙ V`` are staged through SMEM).

Backward, in two kernels. The reverse state pass (``seqmix_gla_bwd_state``, same grid, chunks last to
first) carries ``dS [Dk, block_dv]`` fp32 in registers (initialized from the final-state cotangent,
written out as ``d initial_state``), ``dS ← a ⊙_rows dS + Qᵀ (wq ⊙_rows dO)``, and saves each chunk's
end-state cotangent ``[B, H, N, Dk, Dv]`` in the operand dtype. The chunk-parallel kernel
(``seqmix_gla_bwd``, grid ``(Dv / block_dv, H, B·N)``, one CTA per chunk) then forms, with ``dO`` already
scaled by ``scale`` (plain jnp), from the chunk's start state S and end cotangent dS:

    dA  = (dO Vᵀ) ⊙ Γ without the diagonal,   dpd_i = dO_i · V_i   (the diagonal of dO Vᵀ)
    dQᵀ = S (wq ⊙_rows dO)ᵀ + Kᵀ dAᵀ,        dKᵀ = dS (wk ⊙_rows V)ᵀ + Qᵀ dA     (one accumulator each)
    dV  = wk ⊙_rows (K dS) + ((K Qᵀ) ⊙ Γᵀ) dO

(One kernel doing both spilled ~612 B at 255 registers for Dk = 128; split, they use 128 and ~160
registers without spills, and the chunk-parallel half runs B·H·N CTAs instead of B·H.)
(``dA``, ``dAᵀ``, ``Pᵀ`` and the scaled ``dO``, ``dOᵀ``, ``Vᵀ`` are staged through SMEM; ``Γᵀ`` is
recomputed from the token rows rather than transposed.)

dQ and dK come out transposed (``[Dv / block_dv, B, H, Dk, Tp]`` fp32, one partial sum per Dv tile);
plain jnp sums the tiles, transposes, adds the diagonal term ``dpd ⊙ k`` / ``dpd ⊙ q`` and forms the gate
gradient in closed form (§2.6): ``d log b = Σ_c (q ⊙ dq − k ⊙ dk)`` without the i = j term (it cancels
exactly), ``+ Σ S_T ⊙ dS_T`` at the row end, ``dg = `` segmented reverse cumsum (fp32).

Per-channel gates (``gate="channel"``, g ``[B, H, Tp, Dk]``; FAMILIES.md §2.6, the "anchored" path of
``seqmix/ops/_gated_chunk.py``): per chunk and channel the wrapper picks the anchor ``m`` = middle of the
chunk's range of G and passes the kernels ``Qa = Q ⊙ exp(G − m)``, ``Ka = K ⊙ exp(m − G)`` (input dtype, in
place of q, k), token rows with ``G = 0`` (Γ is then the causal-segment mask and ``wq``, ``wk`` 0/1 masks) and
per chunk ``anc [B, H, N, 2, Dk]`` fp32 = ``(exp(m), exp(G_C − m))``. Then ``P = (Qa Kaᵀ) ⊙ M`` (one C×C
``wgmma``), ``Q ⊙ exp(G) S = Qa (exp(m) ⊙_rows S)`` and ``(K ⊙ exp(G_C − G))ᵀ V = exp(G_C − m) ⊙_rows Kaᵀ V``,
so the kernels differ only by three per-row (per state channel) fp32 scalings of ``[Dk, block_dv]`` tiles:
the forward stages ``exp(m) ⊙_rows S`` (also what it saves as the chunk-start state) and scales the state
update by ``exp(G_C − m)``; the backward stages ``exp(G_C − m) ⊙_rows dS`` and scales its ``dS`` update by
``exp(m)``. The kernels return gradients of Qa, Ka; plain jnp multiplies them by ``exp(G − m)``, ``exp(m − G)``
and forms ``d log b`` per channel (no sum over Dk) with the per-channel final-state term
``Σ_v S_T ⊙ dS_T``. Valid when every chunk's per-channel span ``max G − min G`` is at most
:data:`ANCHOR_SPAN` = 40 nats (factors within ``e^{±20}``; a hard reset, g clamped to -30, fits). For wider
spans :func:`gated_linear_attention` takes, by one ``lax.cond`` on the whole call (:func:`anchorable`),
:func:`exact_channel`: a plain-jnp chunk scan that forms ``exp(G_i − G_j)`` per channel (exact, slow).
fp16 is refused for per-channel gates (``e^{20}·|q|`` overflows it); bf16 shares fp32's exponent range.

Numerics: fp32 ``wgmma`` accumulators, state carries, gate cumsums, decay factors, ``P`` before its cast to
the operand dtype, gradient partial sums; log gates are clamped at ``gate_math.LOG_GATE_FLOOR`` (-30) by
the wrapper, so ``g = -inf`` is a hard reset. Only differences ≤ 0 are exponentiated. fp32 inputs run in
the interpreter (exact fp32 products there); on hardware the f32 (tf32) ``wgmma`` accepts K-major operands
only, so fp32 is not a compile target of this kernel (bf16 / fp16 are).

The sequential kernels' inputs load ``GLATiles.stages − 1`` chunks ahead into a ring of SMEM slots
(:func:`pallas_kernels.gpu.chunk_loop.run_chunks`); there is no separate producer warpgroup.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gate_math import bounded_log_gate, segmented_reverse_cumsum

# Small Mosaic GPU helpers shared with the flash-attention kernel (candidates for pallas_kernels/gpu/_common.py).
from pallas_kernels.gpu.flash_attention import (  # noqa: F401 - re-exported for the tests
    MAX_SMEM_BYTES,
    MAX_TMA_BOX,
    _bcast,
    _kernel,
    _Lane,
    _matmul,
    _smem,
    interpret_params,
    load,
    plgpu,
    reset_interpreter,
)
from pallas_kernels.gpu.chunk_loop import matmul_sum as _matmul_sum
from pallas_kernels.gpu.chunk_loop import run_chunks
from pallas_kernels.gpu.chunk_loop import tile as _tile

F32 = jnp.float32
TOK_ROWS = 5
ROW_G, ROW_START, ROW_POS, ROW_WQ, ROW_WK = range(TOK_ROWS)
GATES = ("none", "scalar", "channel")
#: Per-channel gates: the largest per-chunk, per-channel span ``max G − min G`` (nats) that the anchored
#: kernel takes (the same rule as ``seqmix.ops._gated_chunk.ANCHOR_SPAN``); factors stay within e^{±20}.
ANCHOR_SPAN = 40.0
ANC_ROWS = 2  # per chunk and channel: exp(m), exp(G_C − m)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class GLATiles:
    """Tile sizes: ``chunk`` tokens per chunk (the ``wgmma`` M of the intra-chunk products: a multiple of 64,
    at most 256), ``block_dv`` value columns per CTA (a multiple of 64, at most 256), ``stages`` ring slots
    for a chunk's inputs in the sequential kernels (1: load, then compute; 2: the next chunk's loads overlap
    this chunk's compute; :mod:`pallas_kernels.gpu.chunk_loop`)."""

    chunk: int = 64
    block_dv: int = 64
    stages: int = 2

    def __post_init__(self):
        for name in ("chunk", "block_dv"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 64 or val % 64 or val > MAX_TMA_BOX:
                raise ValueError(f"GLATiles.{name} must be a multiple of 64 in [64, 256]; got {val!r}")
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 4:
            raise ValueError(f"GLATiles.stages must be an int in [1, 4]; got {self.stages!r}")


#: H100, Dk = Dv = 128, bf16: 64-token chunks, two 64-column Dv tiles per head (state tile 128×64 fp32).
H100_TILES = GLATiles(chunk=64, block_dv=64)
#: The smallest legal tiles: for the interpreter tests.
INTERPRET_TILES = GLATiles(chunk=64, block_dv=64)


@dataclasses.dataclass(frozen=True)
class GLAGpuConfig:
    """Static settings of one call (hashable: the ``custom_vjp``'s non-differentiable argument).

    gate: "none" | "scalar" | "channel"; gate_grad: whether g receives a gradient (False: retention's constant decay).
    out_dtype: dtype name of ``o`` (None: the input dtype). interpret: None compiles with Mosaic GPU, else an
    ``InterpretGPUParams`` (:func:`interpret_params`). split_cotangent: run the backward kernels on the
    operand-dtype high part of ``dO`` and again on its low part (``dO − hi``) and add the results (the
    backward is linear in ``dO``): twice the backward work for a ``dO`` carried to ~16 bits instead of 8,
    for callers whose gradients cancel (linear attention's normalizer: its bf16 dq misses the tolerance
    without it).
    """

    scale: float
    gate: str = "scalar"
    gate_grad: bool = True
    tiles: GLATiles = H100_TILES
    out_dtype: str | None = None
    interpret: Any = None
    approx_math: bool = False
    split_cotangent: bool = False

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}; got {self.gate!r}")


def _compiler_params(cfg: GLAGpuConfig):
    return None if cfg.interpret is not None else plgpu.CompilerParams(approx_math=cfg.approx_math)


def smem_bytes(tiles: GLATiles, dk: int, dv: int, dtype, gate: str = "scalar") -> dict[str, int]:
    """SMEM each kernel allocates (buffers only), to check against :data:`MAX_SMEM_BYTES`."""
    it = jnp.dtype(dtype).itemsize
    c, bdv, ns = tiles.chunk, tiles.block_dv, tiles.stages
    tok = TOK_ROWS * c * 4
    # The sequential kernels hold their chunk inputs in rings of `ns` slots (the first term of each).
    fwd = ns * ((2 * c * dk + c * bdv) * it + tok + dk * 4) + (dk * bdv + c * c + 2 * c * bdv) * it + dk * bdv * 4
    bwd_state = ns * ((dk * c + c * bdv) * it + tok + dk * 4) + (dk * bdv + c * bdv) * it + dk * bdv * 4
    bwd = (3 * c * dk + 7 * c * bdv + 2 * dk * bdv + 3 * c * c) * it + dk * c * 4 + tok + c * 4
    if gate == "channel":  # the (exp(m), exp(G_C − m)) rows of a chunk
        fwd, bwd_state = fwd + ns * ANC_ROWS * dk * 4, bwd_state + ns * ANC_ROWS * dk * 4
    return {"fwd": fwd, "bwd_state": bwd_state, "bwd": bwd}


def _gamma(lane: _Lane, tok_s, shape, transposed: bool):
    """Γ (rows i, cols j) or Γᵀ (rows j, cols i) of the chunk, fp32, from the SMEM token rows."""

    def both(row):
        r = _bcast(lane.vec(tok_s.at[row], 1), shape, 1)
        c = _bcast(lane.vec(tok_s.at[row], 0), shape, 0)
        return (c, r) if transposed else (r, c)

    gi, gj = both(ROW_G)
    pi, pj = both(ROW_POS)
    start_i = both(ROW_START)[0]
    ok = (pj <= pi) & (pj >= start_i)  # j ≤ i in i's document
    return jnp.exp(jnp.where(ok, gi - gj, -jnp.inf)), pi == pj


# ----------------------------------------------------------------------------- forward kernel


def _fwd_call(cfg: GLAGpuConfig, q, k, v, tok, decay, h0, save_states: bool, anc=None):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c, bdv, ns = cfg.tiles.chunk, cfg.tiles.block_dv, cfg.tiles.stages
    n_chunks, ndv = tp // c, dv // bdv
    dt = q.dtype
    odt = jnp.dtype(cfg.out_dtype) if cfg.out_dtype else dt
    lane = _Lane(cfg.interpret is not None)
    kt = jnp.swapaxes(k, 2, 3)
    chan = anc is not None  # per-channel gates: q, k are the anchored Q ⊙ exp(G − m), K ⊙ exp(m − G)

    def body(q_ref, kt_ref, v_ref, tok_ref, a_ref, h0_ref, *rest):
        anc_ref = None
        if chan:
            anc_ref, rest = rest[0], rest[1:]
        if save_states:
            o_ref, sf_ref, st_ref = rest[:3]
            rest = rest[3:]
        else:
            (o_ref, sf_ref), st_ref, rest = rest[:2], None, rest[2:]
        q_r, kt_r, v_r, tok_r, a_r, s_s, p_s, vw_s, o_s, sf_s = rest[:10]  # *_r: rings of `stages` slots
        anc_r = rest[10] if chan else None
        init_bar, ring_bar = rest[-2:]

        def loads(at, slot):
            n, rows, cols, bi, hi = at.n, at.rows, at.cols, at.b, at.h
            copies = [(q_ref.at[bi, hi, rows, :], q_r.at[slot]), (kt_ref.at[bi, hi, :, rows], kt_r.at[slot]),
                      (v_ref.at[bi, hi, rows, cols], v_r.at[slot]), (tok_ref.at[bi, hi, :, rows], tok_r.at[slot]),
                      (a_ref.at[bi, hi, n, :], a_r.at[slot])]
            return copies + ([(anc_ref.at[bi, hi, n], anc_r.at[slot])] if chan else [])

        def step(at, slot, s):
            n, rows, cols, bi, hi = at.n, at.rows, at.cols, at.b, at.h
            q_s, kt_s, v_s, tok_s, a_s = (x.at[slot] for x in (q_r, kt_r, v_r, tok_r, a_r))
            anc_s = anc_r.at[slot] if chan else None
            if chan:  # exp(m) ⊙_rows S: Q ⊙ exp(G) S = (Q ⊙ exp(G − m)) (exp(m) ⊙_rows S)
                s_s[...] = (_bcast(lane.vec(anc_s.at[0], 1), (dk, bdv), 1) * s).astype(dt)
            else:
                s_s[...] = s.astype(dt)
            gamma, _ = _gamma(lane, tok_s, (c, c), False)
            p_s[...] = (_matmul((c, c), q_s, kt_s) * gamma).astype(dt)
            wk = lane.vec(tok_s.at[ROW_WK], 1)
            vw_s[...] = (_tile(lane, v_s).astype(F32) * _bcast(wk, (c, bdv), 1)).astype(dt)
            plgpu.commit_smem()
            if st_ref is not None:
                plgpu.copy_smem_to_gmem(s_s, st_ref.at[bi, hi, n, :, cols])
            wq = lane.vec(tok_s.at[ROW_WQ], 1)
            o = _bcast(wq, (c, bdv), 1) * _matmul((c, bdv), q_s, s_s) + _matmul((c, bdv), p_s, v_s)
            o_s[...] = (o * cfg.scale).astype(odt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, hi, rows, cols])
            a = lane.vec(a_s, 1)
            upd = _matmul((dk, bdv), kt_s, vw_s)
            if chan:  # (K ⊙ exp(G_C − G))ᵀ V = exp(G_C − m) ⊙_rows (K ⊙ exp(m − G))ᵀ V
                upd = _bcast(lane.vec(anc_s.at[1], 1), (dk, bdv), 1) * upd
            return _bcast(a, (dk, bdv), 1) * s + upd

        run_chunks(lane, step, loads, stages=ns, ring_bar=ring_bar, first_ref=h0_ref, last_ref=sf_ref, carry_s=sf_s,
                   bar=init_bar, n_chunks=n_chunks, chunk=c, block_dv=bdv)

    scratch = [
        _smem((ns, c, dk), dt, mma=True),  # q
        _smem((ns, dk, c), dt, mma=True),  # kT
        _smem((ns, c, bdv), dt, mma=True),  # v
        _smem((ns, TOK_ROWS, c), F32),  # token rows
        _smem((ns, dk), F32),  # chunk decay a
        _smem((dk, bdv), dt, mma=True),  # S in the operand dtype (also the saved chunk-start state)
        _smem((c, c), dt, mma=True),  # P
        _smem((c, bdv), dt, mma=True),  # wk ⊙ V
        _smem((c, bdv), odt, mma=True),  # o
        _smem((dk, bdv), F32, mma=True),  # h0, then the final state
    ]
    if chan:
        scratch.append(_smem((ns, ANC_ROWS, dk), F32))  # exp(m), exp(G_C − m)
    scratch += [
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # h0
        plgpu.Barrier(num_arrivals=5 + chan, num_barriers=ns),  # the copies of a chunk, per ring slot
    ]
    out = [jax.ShapeDtypeStruct((b, h, tp, dv), odt), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if save_states:
        out.append(jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), dt))
    return _kernel(body, out, scratch, name="seqmix_gla_fwd", grid=(ndv, h, b), grid_names=("dv", "h", "b"),
                   compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        q, kt, v, tok, decay, h0, *([anc] if chan else []))


# ----------------------------------------------------------------------------- backward kernel


def _bwd_state_call(cfg: GLAGpuConfig, q, do, tok, decay, dsf, anc=None):
    """The reverse state pass: ``dS ← a ⊙_rows dS + Qᵀ (wq ⊙_rows dO)`` over the chunks, last to first.

    Returns each chunk's end-state cotangent ``[B, H, N, Dk, Dv]`` in the operand dtype (per-channel gates:
    already ``exp(G_C − m) ⊙_rows dS``, the form both its uses take) and ``d h0`` fp32."""
    b, h, tp, dk = q.shape
    dv = do.shape[-1]
    c, bdv, ns = cfg.tiles.chunk, cfg.tiles.block_dv, cfg.tiles.stages
    n_chunks, ndv = tp // c, dv // bdv
    dt = q.dtype
    lane = _Lane(cfg.interpret is not None)
    qt = jnp.swapaxes(q, 2, 3)
    chan = anc is not None

    def body(qt_ref, do_ref, tok_ref, a_ref, dsf_ref, *rest):
        anc_ref = None
        if chan:
            anc_ref, rest = rest[0], rest[1:]
        dse_ref, dh0_ref, qt_r, do_r, tok_r, a_r, ds_s, dow_s, dsf_s = rest[:9]  # *_r: rings of `stages` slots
        anc_r, (init_bar, ring_bar) = (rest[9], rest[10:]) if chan else (None, rest[9:])

        def loads(at, slot):
            n, rows, cols, bi, hi = at.n, at.rows, at.cols, at.b, at.h
            copies = [(qt_ref.at[bi, hi, :, rows], qt_r.at[slot]), (do_ref.at[bi, hi, rows, cols], do_r.at[slot]),
                      (tok_ref.at[bi, hi, :, rows], tok_r.at[slot]), (a_ref.at[bi, hi, n, :], a_r.at[slot])]
            return copies + ([(anc_ref.at[bi, hi, n], anc_r.at[slot])] if chan else [])

        def step(at, slot, ds):
            n, cols, bi, hi = at.n, at.cols, at.b, at.h
            qt_s, do_s, tok_s, a_s = (x.at[slot] for x in (qt_r, do_r, tok_r, a_r))
            anc_s = anc_r.at[slot] if chan else None
            if chan:  # both uses of dS (dKᵀ, dV) see exp(G_C − m) ⊙_rows dS
                ds_s[...] = (_bcast(lane.vec(anc_s.at[1], 1), (dk, bdv), 1) * ds).astype(dt)
            else:
                ds_s[...] = ds.astype(dt)
            wq = lane.vec(tok_s.at[ROW_WQ], 1)
            dow_s[...] = (_tile(lane, do_s).astype(F32) * _bcast(wq, (c, bdv), 1)).astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ds_s, dse_ref.at[bi, hi, n, :, cols])
            upd = _matmul((dk, bdv), qt_s, dow_s)
            if chan:  # (Q ⊙ exp(G))ᵀ (wq ⊙ dO) = exp(m) ⊙_rows (Q ⊙ exp(G − m))ᵀ (wq ⊙ dO)
                upd = _bcast(lane.vec(anc_s.at[0], 1), (dk, bdv), 1) * upd
            return _bcast(lane.vec(a_s, 1), (dk, bdv), 1) * ds + upd

        run_chunks(lane, step, loads, stages=ns, ring_bar=ring_bar, first_ref=dsf_ref, last_ref=dh0_ref,
                   carry_s=dsf_s, bar=init_bar, n_chunks=n_chunks, chunk=c, block_dv=bdv, reverse=True)

    scratch = [
        _smem((ns, dk, c), dt, mma=True),  # qT
        _smem((ns, c, bdv), dt, mma=True),  # dO (scaled)
        _smem((ns, TOK_ROWS, c), F32),  # token rows
        _smem((ns, dk), F32),  # chunk decay a
        _smem((dk, bdv), dt, mma=True),  # dS in the operand dtype (saved)
        _smem((c, bdv), dt, mma=True),  # wq ⊙ dO
        _smem((dk, bdv), F32, mma=True),  # dS_T, then d h0
    ]
    if chan:
        scratch.append(_smem((ns, ANC_ROWS, dk), F32))  # exp(m), exp(G_C − m)
    scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=1), plgpu.Barrier(num_arrivals=4 + chan, num_barriers=ns)]
    out = [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), dt), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    return _kernel(body, out, scratch, name="seqmix_gla_bwd_state", grid=(ndv, h, b), grid_names=("dv", "h", "b"),
                   compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        qt, do, tok, decay, dsf, *([anc] if chan else []))


def _bwd_call(cfg: GLAGpuConfig, q, k, v, do, tok, states, dends):
    """The chunk-parallel backward: one CTA per (Dv tile, head, batch row · chunk), from the chunk's start
    state and end-state cotangent (:func:`_bwd_state_call`). Returns dQᵀ, dKᵀ partials per Dv tile, dV and
    the diagonal of dO Vᵀ (module docstring)."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c, bdv = cfg.tiles.chunk, cfg.tiles.block_dv
    n_chunks, ndv = tp // c, dv // bdv
    dt = q.dtype
    lane = _Lane(cfg.interpret is not None)
    qt, kt, vt, dot = (jnp.swapaxes(x, 2, 3) for x in (q, k, v, do))

    def body(qt_ref, k_ref, kt_ref, v_ref, vt_ref, do_ref, dot_ref, tok_ref, st_ref, dse_ref,
             dqt_ref, dkt_ref, dv_ref, dpd_ref,
             qt_s, k_s, kt_s, v_s, vt_s, do_s, dot_s, tok_s, st_s, ds_s, da_s, dat_s, pt_s, dow_s,
             dowt_s, vwt_s, dqk_s, dpd_s, bar):
        j, hi, bn = lax.axis_index("dv"), lax.axis_index("h"), lax.axis_index("bn")
        bi, n = bn // n_chunks, bn % n_chunks
        cols = pl.ds(pl.multiple_of(j * bdv, bdv), bdv)
        rows = pl.ds(pl.multiple_of(n * c, c), c)
        plgpu.copy_gmem_to_smem(qt_ref.at[bi, hi, :, rows], qt_s, bar)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, rows, :], k_s, bar)
        plgpu.copy_gmem_to_smem(kt_ref.at[bi, hi, :, rows], kt_s, bar)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, rows, cols], v_s, bar)
        plgpu.copy_gmem_to_smem(vt_ref.at[bi, hi, cols, rows], vt_s, bar)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, rows, cols], do_s, bar)
        plgpu.copy_gmem_to_smem(dot_ref.at[bi, hi, cols, rows], dot_s, bar)
        plgpu.copy_gmem_to_smem(tok_ref.at[bi, hi, :, rows], tok_s, bar)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, hi, n, :, cols], st_s, bar)
        plgpu.copy_gmem_to_smem(dse_ref.at[bi, hi, n, :, cols], ds_s, bar)
        plgpu.barrier_wait(bar)
        gamma, eye = _gamma(lane, tok_s, (c, c), False)
        dp = _matmul((c, c), do_s, vt_s)  # dO Vᵀ (rows i, cols j)
        dpd_s[...] = jnp.sum(jnp.where(eye, dp, 0.0), axis=1)
        da_s[...] = jnp.where(eye, 0.0, dp * gamma).astype(dt)
        gamma_t, _ = _gamma(lane, tok_s, (c, c), True)
        dpt = _matmul((c, c), v_s, dot_s)  # V dOᵀ (rows j, cols i)
        dat_s[...] = jnp.where(eye, 0.0, dpt * gamma_t).astype(dt)
        pt_s[...] = (_matmul((c, c), k_s, qt_s) * gamma_t).astype(dt)
        # Row / column factors staged into the operands, so each output is one accumulator.
        wq_c, wk_c = lane.vec(tok_s.at[ROW_WQ], 0), lane.vec(tok_s.at[ROW_WK], 0)
        dowt_s[...] = (_tile(lane, dot_s).astype(F32) * _bcast(wq_c, (bdv, c), 0)).astype(dt)
        vwt_s[...] = (_tile(lane, vt_s).astype(F32) * _bcast(wk_c, (bdv, c), 0)).astype(dt)
        plgpu.commit_smem()
        dqk_s[...] = _matmul_sum((dk, c), (st_s, dowt_s), (kt_s, dat_s))  # dQᵀ
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dqk_s, dqt_ref.at[j, bi, hi, :, rows])
        plgpu.copy_smem_to_gmem(dpd_s, dpd_ref.at[j, bi, hi, rows])
        dkt = _matmul_sum((dk, c), (ds_s, vwt_s), (qt_s, da_s))
        plgpu.wait_smem_to_gmem(0)  # dQᵀ is out of the staging tile
        dqk_s[...] = dkt
        wk_r = lane.vec(tok_s.at[ROW_WK], 1)
        dow_s[...] = (_bcast(wk_r, (c, bdv), 1) * _matmul((c, bdv), k_s, ds_s)
                      + _matmul((c, bdv), pt_s, do_s)).astype(dt)  # dV
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dqk_s, dkt_ref.at[j, bi, hi, :, rows])
        plgpu.copy_smem_to_gmem(dow_s, dv_ref.at[bi, hi, rows, cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((dk, c), dt, mma=True),  # qT
        _smem((c, dk), dt, mma=True),  # k
        _smem((dk, c), dt, mma=True),  # kT
        _smem((c, bdv), dt, mma=True),  # v
        _smem((bdv, c), dt, mma=True),  # vT
        _smem((c, bdv), dt, mma=True),  # dO (scaled)
        _smem((bdv, c), dt, mma=True),  # dOᵀ
        _smem((TOK_ROWS, c), F32),  # token rows
        _smem((dk, bdv), dt, mma=True),  # chunk-start state S
        _smem((dk, bdv), dt, mma=True),  # dS (chunk-end state cotangent, as the state pass saved it)
        _smem((c, c), dt, mma=True),  # dA
        _smem((c, c), dt, mma=True),  # dAᵀ
        _smem((c, c), dt, mma=True),  # Pᵀ
        _smem((c, bdv), dt, mma=True),  # dV
        _smem((bdv, c), dt, mma=True),  # (wq ⊙ dO)ᵀ
        _smem((bdv, c), dt, mma=True),  # (wk ⊙ V)ᵀ
        _smem((dk, c), F32, mma=True),  # dQᵀ / dKᵀ staging
        _smem((c,), F32),  # diagonal of dO Vᵀ
        plgpu.Barrier(num_arrivals=10, num_barriers=1),
    ]
    out = [jax.ShapeDtypeStruct((ndv, b, h, dk, tp), F32), jax.ShapeDtypeStruct((ndv, b, h, dk, tp), F32),
           jax.ShapeDtypeStruct((b, h, tp, dv), dt), jax.ShapeDtypeStruct((ndv, b, h, tp), F32)]
    return _kernel(body, out, scratch, name="seqmix_gla_bwd", grid=(ndv, h, b * n_chunks),
                   grid_names=("dv", "h", "bn"), compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        qt, k, kt, v, vt, do, dot, tok, states, dends)


# ----------------------------------------------------------------------------- layout and custom_vjp


def chunk_lanes(g, resets, b: int, h: int, tp: int, dk: int, chunk: int):
    """Per-token rows ``tok [B, H, 5, Tp]`` and per-chunk decay ``[B, H, N, Dk]`` (fp32; module docstring).

    g: fp32 ``[B, H, Tp]`` clamped log gate or None (no decay); resets: bool ``[B, Tp]`` or None.
    """
    n = tp // chunk
    if g is None:
        big_g = jnp.zeros((b, h, n, chunk), F32)
    else:
        big_g = jnp.cumsum(g.astype(F32).reshape(b, h, n, chunk), axis=-1)
    if resets is None:
        sid = jnp.zeros((b, 1, n, chunk), F32)
    else:
        sid = jnp.cumsum(resets.astype(jnp.int32).reshape(b, 1, n, chunk), axis=-1).astype(F32)
    sid = jnp.broadcast_to(sid, (b, h, n, chunk))
    pos = jnp.broadcast_to(jnp.arange(chunk, dtype=F32), (b, h, n, chunk))
    s_last = sid[..., -1:]
    g_c = big_g[..., -1:]
    first, last, carry = sid == 0.0, sid == s_last, s_last == 0.0
    wq = jnp.exp(jnp.where(first, big_g, -jnp.inf))
    wk = jnp.exp(jnp.where(last, g_c - big_g, -jnp.inf))
    a = jnp.exp(jnp.where(carry, g_c, -jnp.inf))  # [B, H, N, 1]
    if resets is None:
        start = jnp.zeros_like(pos)
    else:
        r = resets.reshape(b, 1, n, chunk)
        start = lax.cummax(jnp.where(r, jnp.arange(chunk, dtype=F32), 0.0), axis=3)
        start = jnp.broadcast_to(start, (b, h, n, chunk))
    tok = jnp.stack([big_g, start, pos, wq, wk], axis=2).reshape(b, h, TOK_ROWS, tp)
    return tok, jnp.broadcast_to(a, (b, h, n, dk))


def _chunk_g(g, b: int, h: int, tp: int, chunk: int):
    """Chunk-local inclusive cumsum of a per-channel log gate: ``[B, H, Tp, Dk]`` -> ``[B, H, N, C, Dk]`` fp32."""
    return jnp.cumsum(g.astype(F32).reshape(b, h, tp // chunk, chunk, -1), axis=3)


def anchorable(g, chunk: int):
    """Scalar bool: every chunk's per-channel span ``max G − min G`` of the clamped per-channel log gate
    ``g [B, H, Tp, Dk]`` is at most :data:`ANCHOR_SPAN` (the kernel's validity condition)."""
    b, h, tp, _ = g.shape
    big_g = _chunk_g(g, b, h, tp, chunk)
    return jnp.all(big_g.max(axis=3) - big_g.min(axis=3) <= ANCHOR_SPAN)


class ChannelLanes(NamedTuple):
    tok: Any  # [B, H, 5, Tp] fp32 token rows with G = 0 (Γ is the mask) and 0/1 wq, wk
    decay: Any  # [B, H, N, Dk] fp32 exp(G_C), 0 if the chunk has a reset
    anc: Any  # [B, H, N, 2, Dk] fp32 exp(m), exp(G_C − m)
    eq: Any  # [B, H, Tp, Dk] fp32 exp(G − m)
    ek: Any  # [B, H, Tp, Dk] fp32 exp(m − G)


def channel_lanes(g, resets, b: int, h: int, tp: int, dk: int, chunk: int) -> ChannelLanes:
    """The per-channel (anchored) kernel inputs from the clamped log gate ``g [B, H, Tp, Dk]``.

    ``m`` is the middle of each chunk's and channel's range of G, so on an :func:`anchorable` input
    ``exp(±(G − m))`` and ``exp(G_C − m)`` lie within ``e^{±ANCHOR_SPAN/2}``; ``exp(m) ≤ 1`` for gates ≤ 0.
    The token rows are :func:`chunk_lanes` of no gate (G = 0: Γ is the causal-segment mask; wq, wk masks).
    """
    n = tp // chunk
    tok, _ = chunk_lanes(None, resets, b, h, tp, dk, chunk)
    big_g = _chunk_g(g, b, h, tp, chunk)  # [B, H, N, C, Dk]
    m = 0.5 * (big_g.max(axis=3, keepdims=True) + big_g.min(axis=3, keepdims=True))
    g_c = big_g[:, :, :, -1]  # [B, H, N, Dk]
    if resets is None:
        carry = jnp.ones((b, 1, n, 1), bool)
    else:
        carry = ~jnp.any(resets.reshape(b, 1, n, chunk), axis=-1, keepdims=True)
    decay = jnp.exp(jnp.where(carry, g_c, -jnp.inf))
    anc = jnp.stack([jnp.exp(m[:, :, :, 0]), jnp.exp(g_c - m[:, :, :, 0])], axis=3)
    eq = jnp.exp(big_g - m).reshape(b, h, tp, dk)
    ek = jnp.exp(m - big_g).reshape(b, h, tp, dk)
    return ChannelLanes(tok, decay, anc, eq, ek)


def _check(cfg: GLAGpuConfig, q, k, v, g, h0, resets):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    tl = cfg.tiles
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"bad shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if tp % tl.chunk:
        raise ValueError(f"Tp={tp} must be a multiple of the chunk {tl.chunk}; pad first")
    if dk % 64 or dk > MAX_TMA_BOX:
        raise ValueError(f"Dk={dk} must be a multiple of 64 and <= {MAX_TMA_BOX}")
    if dv % tl.block_dv:
        raise ValueError(f"Dv={dv} must be a multiple of block_dv={tl.block_dv}")
    want = (b, h, tp, dk) if cfg.gate == "channel" else (b, h, tp)
    if g is not None and g.shape != want:
        raise ValueError(f"g must be {'[B, H, Tp, Dk]' if len(want) == 4 else '[B, H, Tp]'} = {want}; "
                         f"got {g.shape}")
    if cfg.gate == "channel" and q.dtype == jnp.float16:
        raise ValueError("per-channel gates take bf16 / fp32 operands: the anchored factors (up to e^20) "
                         "overflow fp16")
    if (g is None) != (cfg.gate == "none"):
        raise ValueError(f"gate={cfg.gate!r} but g is {'None' if g is None else 'given'}")
    if h0 is not None and h0.shape != (b, h, dk, dv):
        raise ValueError(f"initial state must be [B, H, Dk, Dv] = {(b, h, dk, dv)}; got {h0.shape}")
    if resets is not None and resets.shape != (b, tp):
        raise ValueError(f"resets must be [B, Tp] = {(b, tp)}; got {resets.shape}")


def _zeros_h0(q, v):
    return jnp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), F32)


def _anchored(q, k, lanes: ChannelLanes):
    """Q ⊙ exp(G − m), K ⊙ exp(m − G) in the operand dtype."""
    return ((q.astype(F32) * lanes.eq).astype(q.dtype), (k.astype(F32) * lanes.ek).astype(k.dtype))


def _forward(cfg: GLAGpuConfig, q, k, v, g, h0, resets, save_states: bool):
    _check(cfg, q, k, v, g, h0, resets)
    b, h, tp, dk = q.shape
    h0 = _zeros_h0(q, v) if h0 is None else h0.astype(F32)
    if cfg.gate == "channel":
        lanes = channel_lanes(g, resets, b, h, tp, dk, cfg.tiles.chunk)
        qa, ka = _anchored(q, k, lanes)
        return _fwd_call(cfg, qa, ka, v, lanes.tok, lanes.decay, h0, save_states, lanes.anc)
    tok, decay = chunk_lanes(g, resets, b, h, tp, dk, cfg.tiles.chunk)
    return _fwd_call(cfg, q, k, v, tok, decay, h0, save_states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gla_core(cfg: GLAGpuConfig, q, k, v, g, h0, resets):
    """(o [B, H, Tp, Dv], final_state [B, H, Dk, Dv] fp32) in kernel layout (module docstring).

    g: fp32 ``[B, H, Tp]`` log gate, already clamped (:func:`pallas_kernels.gate_math.bounded_log_gate`),
    or None with ``cfg.gate == "none"``; h0 ``[B, H, Dk, Dv]`` or None; resets bool ``[B, Tp]`` or None.
    Differentiable in q, k, v, g (closed form; zeros if ``cfg.gate_grad`` is False) and h0.
    """
    o, sf = _forward(cfg, q, k, v, g, h0, resets, save_states=False)
    return o, sf


def _core_fwd(cfg, q, k, v, g, h0, resets):
    o, sf, states = _forward(cfg, q, k, v, g, h0, resets, save_states=True)
    return (o, sf), (q, k, v, g, h0, resets, states, sf)


def _core_bwd(cfg, res, cts):
    q, k, v, g, h0, resets, states, sf = res
    do, dsf = cts
    b, h, tp, dk = q.shape
    chan = cfg.gate == "channel"
    dsf = jnp.zeros_like(sf) if dsf is None else dsf.astype(F32)
    do = do.astype(F32) * cfg.scale  # o = scale · (...): fold the scale into dO
    if chan:
        lanes = channel_lanes(g, resets, b, h, tp, dk, cfg.tiles.chunk)
        qa, ka = _anchored(q, k, lanes)

        def kernels(do_part, dsf_part):
            dends, dh0 = _bwd_state_call(cfg, qa, do_part, lanes.tok, lanes.decay, dsf_part, lanes.anc)
            return (*_bwd_call(cfg, qa, ka, v, do_part, lanes.tok, states, dends), dh0)
    else:
        tok, decay = chunk_lanes(g, resets, b, h, tp, dk, cfg.tiles.chunk)

        def kernels(do_part, dsf_part):
            dends, dh0 = _bwd_state_call(cfg, q, do_part, tok, decay, dsf_part)
            return (*_bwd_call(cfg, q, k, v, do_part, tok, states, dends), dh0)

    do_hi = do.astype(q.dtype)
    dqt, dkt, dv, dpd, dh0 = kernels(do_hi, dsf)
    dv = dv.astype(F32)
    if cfg.split_cotangent:
        lo = kernels((do - do_hi.astype(F32)).astype(q.dtype), jnp.zeros_like(dsf))
        dqt, dkt, dv, dpd, dh0 = (x + y.astype(F32) for x, y in zip((dqt, dkt, dv, dpd, dh0), lo))
    dq_nd = jnp.swapaxes(jnp.sum(dqt, axis=0), 2, 3)  # without the i = j term
    dk_nd = jnp.swapaxes(jnp.sum(dkt, axis=0), 2, 3)
    if chan:  # gradients of the anchored operands -> of q, k
        dq_nd, dk_nd = dq_nd * lanes.eq, dk_nd * lanes.ek
    dpd = jnp.sum(dpd, axis=0)[..., None]
    qf, kf = q.astype(F32), k.astype(F32)
    dg = None
    if g is not None:
        if cfg.gate_grad:
            dlb = qf * dq_nd - kf * dk_nd  # d log b (the i = j term cancels exactly)
            final = jnp.sum(sf * dsf, axis=-1)  # the final-state term, per channel [B, H, Dk]
            if not chan:
                dlb, final = jnp.sum(dlb, axis=-1), jnp.sum(final, axis=-1)
            dlb = dlb.at[:, :, -1].add(final)
            dg = segmented_reverse_cumsum(dlb, resets).astype(g.dtype)
        else:
            dg = jnp.zeros_like(g)
    dq = (dq_nd + dpd * kf).astype(q.dtype)
    dk = (dk_nd + dpd * qf).astype(k.dtype)
    dh0 = None if h0 is None else dh0.astype(h0.dtype)
    return dq, dk, dv.astype(v.dtype), dg, dh0, None


gla_core.defvjp(_core_fwd, _core_bwd)


def _to_kernel(x, tp):
    """``[B, T, H, ...]`` -> ``[B, H, Tp, ...]`` zero padded."""
    t = x.shape[1]
    if tp != t:
        x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x, 2, 1)


def exact_channel(cfg: GLAGpuConfig, q, k, v, g, h0, resets):
    """The exact per-channel chunked recurrence in plain jnp (fp32), kernel layout like :func:`gla_core`: the
    path for gates too wide for the anchored kernel (some chunk's per-channel span > :data:`ANCHOR_SPAN`).

    A ``lax.scan`` over chunks (rematerialized: residuals are the chunk-start states) that forms
    ``exp(G_i − G_j)`` per channel masked in log space (``[B, H, C, C, Dk]`` per step, no positive
    exponent); differentiated by JAX. Slow next to the kernel, but exact for any gate.
    """
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.tiles.chunk
    n = tp // c
    odt = jnp.dtype(cfg.out_dtype) if cfg.out_dtype else q.dtype
    if not cfg.gate_grad:
        g = lax.stop_gradient(g)
    big_g = _chunk_g(g, b, h, tp, c)
    if resets is None:
        seg = jnp.zeros((b, 1, n, c), jnp.int32)
    else:
        seg = jnp.cumsum(resets.astype(jnp.int32).reshape(b, 1, n, c), axis=-1)
    split = lambda x: jnp.moveaxis(x.astype(F32).reshape(b, h, n, c, -1), 2, 0)  # noqa: E731
    xs = (split(q), split(k), split(v), jnp.moveaxis(big_g, 2, 0), jnp.moveaxis(seg, 2, 0))
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    hi = lax.Precision.HIGHEST

    @jax.checkpoint
    def step(s, x):
        qc, kc, vc, gc, sc = x  # [B, H, C, D] ..., seg [B, 1, C]
        ok = causal & (sc[..., :, None] == sc[..., None, :])  # [B, 1, C, C]
        first, last = sc == 0, sc == sc[..., -1:]
        carry = sc[..., -1:] == 0  # [B, 1, 1]
        gam = jnp.exp(jnp.where(ok[..., None], gc[..., :, None, :] - gc[..., None, :, :], -jnp.inf))
        p = jnp.einsum("bhid,bhjd,bhijd->bhij", qc, kc, gam, precision=hi)
        g_c = gc[..., -1:, :]  # [B, H, 1, Dk]
        wq = jnp.exp(jnp.where(first[..., None], gc, -jnp.inf))
        wk = jnp.exp(jnp.where(last[..., None], g_c - gc, -jnp.inf))
        a = jnp.exp(jnp.where(carry[..., None], g_c, -jnp.inf))[..., 0, :]  # [B, H, Dk]
        o = (jnp.einsum("bhcd,bhde->bhce", qc * wq, s, precision=hi)
             + jnp.einsum("bhij,bhje->bhie", p, vc, precision=hi))
        s = a[..., None] * s + jnp.einsum("bhcd,bhce->bhde", kc * wk, vc, precision=hi)
        return s, o * cfg.scale

    s0 = _zeros_h0(q, v) if h0 is None else h0.astype(F32)
    sf, o = lax.scan(step, s0, xs)
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, tp, dv)
    return o.astype(odt), sf


def gated_linear_attention(cfg: GLAGpuConfig, q, k, v, g=None, initial_state=None, resets=None):
    """The chunked recurrence in the API layout. Returns ``o [B, T, H, Dv]`` (``cfg.out_dtype``, default the
    input dtype) and the final state fp32 ``[B, H, Dk, Dv]``.

    q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (one dtype: the ``wgmma`` operand dtype); g log decay
    ``[B, T, H]`` (``cfg.gate == "scalar"``; clamped here at ``LOG_GATE_FLOOR``, so ``-inf`` is a hard reset),
    per channel ``[B, T, H, Dk]`` (``"channel"``, bf16 / fp32 only: the anchored kernel when every chunk's
    per-channel span is at most :data:`ANCHOR_SPAN` nats, else, chosen for the whole call by ``lax.cond``,
    the exact jnp path :func:`exact_channel`) or None (``"none"``);
    initial_state fp32 ``[B, H, Dk, Dv]`` or None; resets bool ``[B, T]`` (state zeroed before the token)
    or None. Dk a multiple of 64 (<= 256), Dv a multiple of ``cfg.tiles.block_dv``; T is padded to the chunk.
    Differentiable in q, k, v, g (zeros if ``cfg.gate_grad`` is False) and initial_state.
    """
    if (cfg.gate == "channel") != (g is not None and jnp.ndim(g) == 4):
        want = "a [B, T, H, Dk]" if cfg.gate == "channel" else "no or a [B, T, H]"
        raise ValueError(f"gate={cfg.gate!r} needs {want} g; got {None if g is None else jnp.shape(g)}")
    t = q.shape[1]
    c = cfg.tiles.chunk
    tp = -(-t // c) * c
    qk, kk = _to_kernel(q, tp), _to_kernel(k, tp)
    vk = _to_kernel(v.astype(q.dtype), tp)
    gk = None if g is None else _to_kernel(bounded_log_gate(g), tp)
    rk = None
    if resets is not None:
        rk = jnp.pad(jnp.asarray(resets, bool), [(0, 0), (0, tp - t)])
    if cfg.gate == "channel":
        _check(cfg, qk, kk, vk, gk, initial_state, rk)
        o, sf = lax.cond(anchorable(gk, c),
                         lambda *a: gla_core(cfg, *a, rk), lambda *a: exact_channel(cfg, *a, rk),
                         qk, kk, vk, gk, initial_state)
    else:
        o, sf = gla_core(cfg, qk, kk, vk, gk, initial_state, rk)
    return jnp.moveaxis(o, 1, 2)[:, :t], sf
