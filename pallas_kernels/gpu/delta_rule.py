"""The (gated) delta rule's state pass for NVIDIA Hopper (Pallas / Mosaic GPU): forward and backward kernels.

DeltaNet / Gated DeltaNet (FAMILIES.md §2.7) in the chunked WY form splits into a chunk-parallel part and a
sequential one. The chunk-parallel part (per chunk of C tokens: ``A = tril(diag(β)(K Kᵀ ⊙ Γ), −1)``,
``T = (I + A)⁻¹`` as matmuls, ``U = T(β ⊙ V)``, ``W = T(β ⊙ exp(G) ⊙ K)``, the intra-chunk scores) is
:mod:`pallas_kernels.gpu.delta_wy`, one CTA per chunk. This module is the sequential part, with every gate, β
and segment factor already folded into its operands::

    V_new = U − W S,     O = Qg S + P V_new,     S ← a ⊙_rows S + Kdᵀ V_new

per chunk, where ``Qg = scale · Q ⊙ exp(G)`` (rows after the chunk's first reset zeroed), ``P = scale ·
(Q Kᵀ ⊙ Γ)`` (causal, same segment), ``Kd = K ⊙ exp(G_C − G)`` (rows before the last reset zeroed) and ``a``
= ``exp(G_C)`` per state row (0 when the chunk has a reset). Being linear algebra only, its VJP is matmuls
too; the gradients of the operands flow back through the caller's chunk-parallel part by autodiff. Raw
kernels plus their ``custom_vjp``; nothing from ``seqmix`` is imported. Written with ``plgpu.kernel``
(TMA copies + ``plgpu.Barrier`` + ``wgmma``), the same structure as :mod:`pallas_kernels.gpu.gated_linear`.

Kernel layout (``[B, H, Tp, ·]``, ``Tp = N·C``, C = ``tiles.chunk``; the operands are cast to one dtype,
``cfg.dtype``, the ``wgmma`` operand dtype):

* forward: ``qg, w [B, H, Tp, Dk]``, ``p [B, H, Tp, C]`` (chunk n's P in rows ``n·C …``), ``kdT [B, H, Dk,
  Tp]``, ``u [B, H, Tp, Dv]``, ``a [B, H, N, Dk]`` fp32, ``h0 [B, H, Dk, Dv]`` fp32 -> ``o [B, H, Tp, Dv]``,
  ``final_state`` fp32 and (for the backward) the chunk-start states ``[B, H, N, Dk, Dv]`` in the operand dtype.
  Every ``wgmma`` operand is a plain row-major SMEM tile, so the transposes (``Kdᵀ`` here) come from XLA.
* backward: like the forward pass, split into its sequential and its chunk-parallel part. The kernel
  runs the chunks in reverse, carrying ``dS`` fp32 in registers (initialized from the final-state
  cotangent, written out as ``d initial_state``) and saving each chunk's end-state cotangent::

      dV_new = Pᵀ dO + Kd dS,      dS ← a ⊙_rows dS + Qgᵀ dO − Wᵀ dV_new

  from ``qgT, wT [B, H, Dk, Tp]``, ``pT [B, H, Tp, C]`` (chunk n's Pᵀ), ``kd [B, H, Tp, Dk]`` and ``dO``.
  Everything else is batched matmuls over all chunks at once (:func:`_chunk_grads`, XLA): with the saved
  chunk-start states S and end cotangents dS, ``V_new = U − W S``, ``dU = dV_new``, ``dQg = dO Sᵀ``,
  ``dW = −dV_new Sᵀ``, ``dP = dO V_newᵀ``, ``dKd = V_new dSᵀ``, ``da = Σ_cols S ⊙ dS``. (A first version
  formed all of these in the kernel: 255 registers and 312 bytes of spills at Dk = 128; the sequential
  kernel alone does not spill, and the parallel part gets the whole GPU.)

Grid ``(Dv / block_dv, H, B)``, one warpgroup per CTA, a sequential ``fori_loop`` over chunks. Numerics:
fp32 ``wgmma`` accumulators, state and its cotangent in fp32 registers; ``V_new`` and the state are rounded
to the operand dtype for the next ``wgmma`` (as ``P`` is in the gated-linear kernel). fp32 inputs run in
the interpreter only (the fp32 / tf32 ``wgmma`` wants K-major operands on hardware).

The sequential kernels' inputs load ``GLATiles.stages − 1`` chunks ahead into a ring of SMEM slots
(:func:`pallas_kernels.gpu.chunk_loop.run_chunks`); there is no separate producer warpgroup.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gpu.chunk_loop import matmul_sum, run_chunks, tile
from pallas_kernels.gpu.flash_attention import MAX_TMA_BOX, _bcast, _kernel, _Lane, _matmul, _smem, plgpu
# The recurrent kernels share one tile description (chunk rows, value columns per CTA) and its H100 and
# interpreter choices.
from pallas_kernels.gpu.gated_linear import H100_TILES, INTERPRET_TILES, GLATiles, _compiler_params  # noqa: F401

F32 = jnp.float32

@dataclasses.dataclass(frozen=True)
class DeltaGpuConfig:
    """Static settings (hashable). dtype: the ``wgmma`` operand dtype (bfloat16 / float16 compiled; float32 in
    the interpreter); out_dtype: dtype name of ``o`` (None: ``dtype``). interpret: None compiles with Mosaic
    GPU, else an ``InterpretGPUParams``."""

    dtype: str = "bfloat16"
    tiles: GLATiles = H100_TILES
    out_dtype: str | None = None
    interpret: Any = None
    approx_math: bool = False


def smem_bytes(tiles: GLATiles, dk: int, dv: int, dtype, out_dtype=None) -> dict[str, int]:
    """SMEM each kernel allocates (buffers only; the scratch lists below), to check against the H100's
    227 KiB. ``out_dtype``: that of ``o`` (default ``dtype``)."""
    it = jnp.dtype(dtype).itemsize
    ot = jnp.dtype(out_dtype or dtype).itemsize
    c, bdv, ns = tiles.chunk, tiles.block_dv, tiles.stages
    # The chunk inputs sit in rings of `ns` slots (the first term of each).
    fwd = ns * ((3 * c * dk + c * c + c * bdv) * it + dk * 4) + (c * bdv + dk * bdv) * it + c * bdv * ot + dk * bdv * 4
    bwd = ns * ((3 * dk * c + c * c + c * bdv) * it + dk * 4) + (c * bdv + dk * bdv) * it + dk * bdv * 4
    return {"fwd": fwd, "bwd": bwd}


# ----------------------------------------------------------------------------- forward kernel


def _fwd_call(cfg: DeltaGpuConfig, qg, p, kd, u, w, a, h0, save_states: bool):
    b, h, tp, dk = qg.shape
    dv = u.shape[-1]
    c, bdv, ns = cfg.tiles.chunk, cfg.tiles.block_dv, cfg.tiles.stages
    n_chunks, ndv = tp // c, dv // bdv
    dt = qg.dtype
    odt = jnp.dtype(cfg.out_dtype) if cfg.out_dtype else dt
    lane = _Lane(cfg.interpret is not None)
    kdt = jnp.swapaxes(kd, 2, 3)

    def body(qg_ref, p_ref, kdt_ref, u_ref, w_ref, a_ref, h0_ref, *rest):
        if save_states:
            o_ref, sf_ref, st_ref = rest[:3]
            rest = rest[3:]
        else:
            (o_ref, sf_ref), st_ref, rest = rest[:2], None, rest[2:]
        qg_r, p_r, kdt_r, u_r, w_r, a_r, s_s, vn_s, o_s, sf_s, init_bar, ring_bar = rest  # *_r: rings

        def loads(at, slot):
            bi, hi, rows, cols = at.b, at.h, at.rows, at.cols
            return [(qg_ref.at[bi, hi, rows, :], qg_r.at[slot]), (p_ref.at[bi, hi, rows, :], p_r.at[slot]),
                    (kdt_ref.at[bi, hi, :, rows], kdt_r.at[slot]), (u_ref.at[bi, hi, rows, cols], u_r.at[slot]),
                    (w_ref.at[bi, hi, rows, :], w_r.at[slot]), (a_ref.at[bi, hi, at.n, :], a_r.at[slot])]

        def step(at, slot, s):
            bi, hi, rows, cols = at.b, at.h, at.rows, at.cols
            qg_s, p_s, kdt_s, u_s, w_s, a_s = (x.at[slot] for x in (qg_r, p_r, kdt_r, u_r, w_r, a_r))
            s_s[...] = s.astype(dt)
            plgpu.commit_smem()
            if st_ref is not None:
                plgpu.copy_smem_to_gmem(s_s, st_ref.at[bi, hi, at.n, :, cols])
            vn = tile(lane, u_s).astype(F32) - _matmul((c, bdv), w_s, s_s)
            vn_s[...] = vn.astype(dt)
            plgpu.commit_smem()
            o_s[...] = matmul_sum((c, bdv), (qg_s, s_s), (p_s, vn_s)).astype(odt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, hi, rows, cols])
            return _bcast(lane.vec(a_s, 1), (dk, bdv), 1) * s + _matmul((dk, bdv), kdt_s, vn_s)

        run_chunks(lane, step, loads, stages=ns, ring_bar=ring_bar, first_ref=h0_ref, last_ref=sf_ref, carry_s=sf_s,
                   bar=init_bar, n_chunks=n_chunks, chunk=c, block_dv=bdv)

    scratch = [
        _smem((ns, c, dk), dt, mma=True),  # Qg
        _smem((ns, c, c), dt, mma=True),  # P
        _smem((ns, dk, c), dt, mma=True),  # Kdᵀ
        _smem((ns, c, bdv), dt, mma=True),  # U
        _smem((ns, c, dk), dt, mma=True),  # W
        _smem((ns, dk), F32),  # a
        _smem((dk, bdv), dt, mma=True),  # S in the operand dtype (also the saved chunk-start state)
        _smem((c, bdv), dt, mma=True),  # V_new
        _smem((c, bdv), odt, mma=True),  # O
        _smem((dk, bdv), F32, mma=True),  # h0, then the final state
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # h0
        plgpu.Barrier(num_arrivals=6, num_barriers=ns),  # the copies of a chunk, per ring slot
    ]
    out = [jax.ShapeDtypeStruct((b, h, tp, dv), odt), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if save_states:
        out.append(jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), dt))
    return _kernel(body, out, scratch, name="seqmix_delta_fwd", grid=(ndv, h, b), grid_names=("dv", "h", "b"),
                   compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(qg, p, kdt, u, w, a, h0)


# ----------------------------------------------------------------------------- backward kernel


def chunk_transpose(x, c: int):
    """``[B, H, Tp, C]`` (chunk n's C×C block in rows n·C …) -> the same with every block transposed."""
    b, h, tp, _ = x.shape
    return jnp.swapaxes(x.reshape(b, h, tp // c, c, c), 3, 4).reshape(b, h, tp, c)


def _bwd_call(cfg: DeltaGpuConfig, qg, p, kd, w, a, do, dsf):
    """The reverse state pass: ``(dS_end [B, H, N, Dk, Dv]`` (operand dtype), ``d h0`` fp32)``."""
    b, h, tp, dk = qg.shape
    dv = do.shape[-1]
    c, bdv, ns = cfg.tiles.chunk, cfg.tiles.block_dv, cfg.tiles.stages
    n_chunks, ndv = tp // c, dv // bdv
    dt = qg.dtype
    lane = _Lane(cfg.interpret is not None)
    qgt, wt = (jnp.swapaxes(x, 2, 3) for x in (qg, w))
    pt = chunk_transpose(p, c)

    def body(qgt_ref, pt_ref, kd_ref, wt_ref, a_ref, do_ref, dsf_ref, dse_ref, dh0_ref,
             qgt_r, pt_r, kd_r, wt_r, a_r, do_r, ds_s, ndvn_s, dsf_s, init_bar, ring_bar):
        def loads(at, slot):
            bi, hi, rows, cols = at.b, at.h, at.rows, at.cols
            return [(qgt_ref.at[bi, hi, :, rows], qgt_r.at[slot]), (pt_ref.at[bi, hi, rows, :], pt_r.at[slot]),
                    (kd_ref.at[bi, hi, rows, :], kd_r.at[slot]), (wt_ref.at[bi, hi, :, rows], wt_r.at[slot]),
                    (a_ref.at[bi, hi, at.n, :], a_r.at[slot]), (do_ref.at[bi, hi, rows, cols], do_r.at[slot])]

        def step(at, slot, ds):
            bi, hi, cols = at.b, at.h, at.cols
            qgt_s, pt_s, kd_s, wt_s, a_s, do_s = (x.at[slot] for x in (qgt_r, pt_r, kd_r, wt_r, a_r, do_r))
            ds_s[...] = ds.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ds_s, dse_ref.at[bi, hi, at.n, :, cols])
            dvn = matmul_sum((c, bdv), (pt_s, do_s), (kd_s, ds_s))  # Pᵀ dO + Kd dS
            ndvn_s[...] = (-dvn).astype(dt)
            plgpu.commit_smem()
            upd = matmul_sum((dk, bdv), (qgt_s, do_s), (wt_s, ndvn_s))  # Qgᵀ dO − Wᵀ dV_new
            return _bcast(lane.vec(a_s, 1), (dk, bdv), 1) * ds + upd

        run_chunks(lane, step, loads, stages=ns, ring_bar=ring_bar, first_ref=dsf_ref, last_ref=dh0_ref,
                   carry_s=dsf_s, bar=init_bar, n_chunks=n_chunks, chunk=c, block_dv=bdv, reverse=True)

    scratch = [
        _smem((ns, dk, c), dt, mma=True),  # Qgᵀ
        _smem((ns, c, c), dt, mma=True),  # Pᵀ
        _smem((ns, c, dk), dt, mma=True),  # Kd
        _smem((ns, dk, c), dt, mma=True),  # Wᵀ
        _smem((ns, dk), F32),  # a
        _smem((ns, c, bdv), dt, mma=True),  # dO
        _smem((dk, bdv), dt, mma=True),  # dS (chunk-end state cotangent) in the operand dtype, also saved
        _smem((c, bdv), dt, mma=True),  # −dV_new
        _smem((dk, bdv), F32, mma=True),  # dS_T, then d h0
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
        plgpu.Barrier(num_arrivals=6, num_barriers=ns),  # the copies of a chunk, per ring slot
    ]
    out_shape = [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), dt), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    return _kernel(body, out_shape, scratch, name="seqmix_delta_bwd", grid=(ndv, h, b),
                   grid_names=("dv", "h", "b"), compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        qgt, pt, kd, wt, a, do, dsf)


def _chunk_grads(cfg: DeltaGpuConfig, qg, p, kd, u, w, states, dends, do):
    """The operands' gradients from the chunk-start states and chunk-end cotangents: chunk-parallel batched
    matmuls (XLA), operand-dtype inputs with fp32 accumulation like the kernels' ``wgmma``.

    ``V_new = U − W S``, ``dV_new = Pᵀ dO + Kd dS`` (= dU), ``dQg = dO Sᵀ``, ``dW = −dV_new Sᵀ``,
    ``dP = dO V_newᵀ``, ``dKd = V_new dSᵀ``, ``da = Σ_cols S ⊙ dS``. Returns fp32 kernel-layout gradients.
    """
    b, h, tp, dk = qg.shape
    c = cfg.tiles.chunk
    n = tp // c
    dt = qg.dtype
    prec = lax.Precision.HIGHEST if dt == F32 else None

    def mm(spec, x, y):
        return jnp.einsum(spec, x.astype(dt), y.astype(dt), precision=prec, preferred_element_type=F32)

    ch = lambda x: x.reshape(b, h, n, c, x.shape[-1])  # noqa: E731
    flat = lambda x: x.reshape(b, h, tp, x.shape[-1])  # noqa: E731
    qg, p, kd, u, w, do = map(ch, (qg, p, kd, u, w, do))
    vn = u.astype(F32) - mm("...cd,...dv->...cv", w, states)
    dvn = mm("...ji,...jv->...iv", p, do) + mm("...cd,...dv->...cv", kd, dends)
    dqg = mm("...cv,...dv->...cd", do, states)
    dw = -mm("...cv,...dv->...cd", dvn, states)
    dp = mm("...iv,...jv->...ij", do, vn)
    dkd = mm("...cv,...dv->...cd", vn, dends)
    da = jnp.sum(states.astype(F32) * dends.astype(F32), axis=-1)
    return flat(dqg), flat(dp), flat(dkd), flat(dvn), flat(dw), da


# ----------------------------------------------------------------------------- custom_vjp


def _check(cfg: DeltaGpuConfig, qg, p, kd, u, w, a, h0):
    b, h, tp, dk = qg.shape
    dv = u.shape[-1]
    c, bdv = cfg.tiles.chunk, cfg.tiles.block_dv
    if tp % c:
        raise ValueError(f"Tp={tp} must be a multiple of the chunk {c}; pad first")
    n = tp // c
    want = {"p": (p, (b, h, tp, c)), "kd": (kd, qg.shape), "w": (w, qg.shape), "u": (u, (b, h, tp, dv)),
            "a": (a, (b, h, n, dk)), "h0": (h0, (b, h, dk, dv))}
    for name, (x, shape) in want.items():
        if x.shape != shape:
            raise ValueError(f"{name} must be {shape}; got {x.shape}")
    for name, x in (("qg", qg), ("p", p), ("kd", kd), ("u", u), ("w", w), ("a", a), ("h0", h0)):
        if x.dtype != F32:
            raise ValueError(f"{name} must be float32 (cast to cfg.dtype inside); got {x.dtype}")
    if dk % 64 or dk > MAX_TMA_BOX:
        raise ValueError(f"Dk={dk} must be a multiple of 64 and <= {MAX_TMA_BOX}")
    if dv % bdv:
        raise ValueError(f"Dv={dv} must be a multiple of block_dv={bdv}")


def _operands(cfg: DeltaGpuConfig, *xs):
    return tuple(x.astype(cfg.dtype) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def state_pass(cfg: DeltaGpuConfig, qg, p, kd, u, w, a, h0):
    """``(o [B, H, Tp, Dv], final_state [B, H, Dk, Dv] fp32)`` of the delta rule's state pass (module
    docstring) in kernel layout. Every argument fp32 (qg, p, kd, u, w are cast to ``cfg.dtype`` here, so
    their cotangents stay fp32); differentiable in all of them."""
    _check(cfg, qg, p, kd, u, w, a, h0)
    o, sf = _fwd_call(cfg, *_operands(cfg, qg, p, kd, u, w), a, h0, save_states=False)
    return o, sf


def _vjp_fwd(cfg, qg, p, kd, u, w, a, h0):
    _check(cfg, qg, p, kd, u, w, a, h0)
    ops = _operands(cfg, qg, p, kd, u, w)
    o, sf, states = _fwd_call(cfg, *ops, a, h0, save_states=True)
    return (o, sf), (*ops, a, states)


def _vjp_bwd(cfg, res, cts):
    qg, p, kd, u, w, a, states = res
    do, dsf = cts
    do = do.astype(cfg.dtype)
    dends, dh0 = _bwd_call(cfg, qg, p, kd, w, a, do, dsf.astype(F32))
    return (*_chunk_grads(cfg, qg, p, kd, u, w, states, dends, do), dh0)


state_pass.defvjp(_vjp_fwd, _vjp_bwd)
