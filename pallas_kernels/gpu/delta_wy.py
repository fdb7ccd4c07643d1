"""The (gated) delta rule's chunk-parallel WY part for NVIDIA Hopper (Pallas / Mosaic GPU), with the
triangular inverse as matmuls.

The chunked WY form (FAMILIES.md §2.7) splits into this chunk-parallel part and the sequential state pass
(:mod:`pallas_kernels.gpu.delta_rule`). Per chunk of C tokens, with ``Γ_ij = exp(G_i − G_j)`` for
``j ≤ i`` in the same segment (else 0; ``G`` the chunk-local cumsum of the clamped log gate) and
``wq = exp(G)`` before the chunk's first reset (else 0), one CTA computes::

    A = strictly-lower(β_i (K Kᵀ)_ij Γ_ij)            T = (I + A)⁻¹
    U = T diag(β) V       W = T diag(β ⊙ wq) K       P = scale · (Q Kᵀ ⊙ Γ)

**The inverse as matmuls.** ``T`` is built by doubling the size of its inverted diagonal blocks:
``T₁ = I`` and, with ``A⁽ˢ⁾`` the part of ``A`` in the lower-left ``s × s`` block of each ``2s × 2s``
diagonal block, ``T₂ₛ = Tₛ − Tₛ (A⁽ˢ⁾ Tₛ)`` (for one ``2s`` block: ``[[T₁₁, 0], [−T₂₂ A₂₁ T₁₁, T₂₂]]``,
the merge of ``seqmix.ops._delta_chunk.tri_inverse``), log₂ C levels of two C×C ``wgmma`` each. Unlike
a Neumann series (``Σ (−A)ᵏ``), no power of ``A`` appears: with ``β = 1`` and repeated unit keys the
entries of ``Aᵏ`` reach C(63, 31) ≈ 10¹⁸ while ``T`` stays bidiagonal, so the series cancels
catastrophically; the merges only multiply blocks of ``T`` and of ``A``.

**fp32 products from 16-bit ``wgmma``.** ``A`` and ``T`` are fp32; the tensor cores multiply 16-bit
operands. Each fp32 factor ``x`` is split in the operand dtype as ``hi = round(x)``, ``lo = round(x − hi)``
(16 significant bits in bf16, 22 in fp16) and ``x y ≈ hi·y_hi + hi·y_lo + lo·y_hi`` (three ``wgmma``, fp32
accumulator); ``U``, ``W`` take ``T diag(·)`` split against the exact 16-bit ``V``, ``K`` (two ``wgmma``).
The relative error of the operands (about 2⁻¹⁶ in bf16) is far below that of the 16-bit inputs (2⁻⁸).
fp16 operands keep fp16's range: a factor or cotangent beyond 65504 overflows (bf16 has fp32's range). In
the interpreter with fp32 operands, each product is one exact fp32 ``wgmma``.

Kernel layout ``[B, H, Tp, ·]``, ``Tp = N·C``: ``q, k [B, H, Tp, Dk]``, ``v [B, H, Tp, Dv]`` (the
``wgmma`` operand dtype), ``kT`` (XLA-transposed, so that every ``wgmma`` operand is a row-major SMEM
tile), the token rows ``tok [B, H, 5, Tp]`` of :func:`pallas_kernels.gpu.gated_linear.chunk_lanes`, β
``[B, H, Tp]`` fp32 and the block ids ``[log₂ C + 1, C]`` (``pos // 2ˡ``). Outputs fp32: ``u [B, H, Tp,
Dv]``, ``w [B, H, Tp, Dk]``, ``p [B, H, Tp, C]`` (chunk n's P in rows ``n·C …``) and, for the backward,
``t`` alike. Grid ``(H, B·N)``, one warpgroup per CTA; V in 64-column blocks through a 2-slot ring.

The backward is two more kernels of the same grid from the saved ``T`` (no autodiff through the inverse):
:func:`_bwd_t_call` through U, W and the inverse (``dA = −Tᵀ dT Tᵀ``), then :func:`_bwd_k_call` through
``A``, ``P``, ``Γ`` and β; plain jnp adds the per-token pieces and transposes the C×C gradient blocks.
Raw kernels plus their ``custom_vjp``; nothing from ``seqmix`` is imported.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gate_math import bounded_log_gate
from pallas_kernels.gpu.chunk_loop import matmul_sum, tile
from pallas_kernels.gpu.delta_rule import chunk_transpose
from pallas_kernels.gpu.flash_attention import MAX_TMA_BOX, _bcast, _kernel, _Lane, _matmul, _smem, plgpu
from pallas_kernels.gpu.gated_linear import (
    ROW_G,
    ROW_WK,
    ROW_WQ,
    TOK_ROWS,
    _gamma,
    _to_kernel,
    chunk_lanes,
)

F32 = jnp.float32
VALUE_BLOCK = 64  # V columns per wgmma of U (the state pass's block_dv; any Dv multiple of 64)


@dataclasses.dataclass(frozen=True)
class WYConfig:
    """Static settings (hashable). dtype: the ``wgmma`` operand dtype (bfloat16 / float16 compiled; float32
    in the interpreter); chunk: tokens per chunk (64: the ``wgmma`` M); scale: of ``P``. interpret: None
    compiles with Mosaic GPU, else an ``InterpretGPUParams``."""

    scale: float
    dtype: str = "bfloat16"
    chunk: int = 64
    interpret: Any = None
    approx_math: bool = False


def _compiler_params(cfg: WYConfig):
    return None if cfg.interpret is not None else plgpu.CompilerParams(approx_math=cfg.approx_math)


def block_ids(chunk: int):
    """``[log₂ C + 1, C]`` fp32: row ``l`` holds ``pos // 2ˡ`` (which ``2ˡ`` block of the chunk a token is in)."""
    levels = chunk.bit_length()
    pos = jnp.arange(chunk)
    return jnp.stack([(pos >> lv).astype(F32) for lv in range(levels)])


def smem_bytes(chunk: int, dk: int, dtype) -> dict[str, int]:
    """SMEM each kernel allocates (buffers only), to check against the H100's 227 KiB (any Dv: V and dU
    are visited in 64-column blocks)."""
    it = jnp.dtype(dtype).itemsize
    c, vb = chunk, VALUE_BLOCK
    fwd = ((3 * c * dk + 2 * c * vb) * it + (TOK_ROWS + 1 + c.bit_length()) * c * 4  # inputs
           + 4 * c * c * it + (c * vb + c * dk + 2 * c * c) * 4)  # staged operands, output staging
    bwd_t = 4 * c * c * it + 2 * c * vb * it + (3 * c * c + 2 * c * vb) * 4 + (TOK_ROWS + 3) * c * 4
    bwd_k = 4 * c * dk * it + 6 * c * c * it + (4 * c * c + c * dk) * 4 + 3 * c * 4
    return {"fwd": fwd, "bwd_t": bwd_t, "bwd_k": bwd_k}


# ----------------------------------------------------------------------------- fp32 operands of 16-bit wgmma


def _stage(x, hi_s, lo_s):
    """Stage the fp32 register tile ``x`` as a ``wgmma`` operand in the SMEM tiles' dtype: ``(hi,)`` when
    that is fp32 (the interpreter: exact), else ``(hi, lo)`` with ``hi = x`` rounded and ``lo = x − hi``
    rounded. Callers ``plgpu.commit_smem()`` before the ``wgmma``."""
    x_hi = x.astype(hi_s.dtype)
    hi_s[...] = x_hi
    if hi_s.dtype == F32:
        return (hi_s,)
    lo_s[...] = (x - x_hi.astype(F32)).astype(lo_s.dtype)
    return (hi_s, lo_s)


def _pairs(a, b):
    """The ``wgmma`` pairs of ``a @ b`` for operands given as ``(ref,)`` (exact) or ``(hi, lo)``
    (:func:`_stage`): ``hi·hi + hi·lo + lo·hi`` (the ``lo·lo`` term is below fp32 rounding of the sum)."""
    return [(a[0], b[0])] + [(a[0], lo) for lo in b[1:]] + [(lo, b[0]) for lo in a[1:]]


def _mm(shape, a, b):
    """``a @ b`` (operands as for :func:`_pairs`) in one fp32 accumulator."""
    return matmul_sum(shape, *_pairs(a, b))


def _stage_out(x, smem, dst):
    """Write the register tile ``x`` to ``smem`` and start its copy to the GMEM view ``dst``."""
    smem[...] = x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_call(cfg: WYConfig, q, k, v, tok, beta, save_t: bool):
    b, h, tp, dk = k.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n_chunks, nvb = tp // c, dv // VALUE_BLOCK
    dt = k.dtype
    lane = _Lane(cfg.interpret is not None)
    kt = jnp.swapaxes(k, 2, 3)
    id_rows = block_ids(c)

    def body(q_ref, k_ref, kt_ref, v_ref, tok_ref, beta_ref, ids_ref, u_ref, w_ref, p_ref, *rest):
        t_ref = rest[0] if save_t else None
        rest = rest[1:] if save_t else rest
        (q_s, k_s, kt_s, v_r, tok_s, beta_s, ids_s, xh_s, xl_s, yh_s, yl_s, u_s, w_s, p_s, t_s,
         bar, v_bar) = rest
        hi, bn = lax.axis_index("h"), lax.axis_index("bn")
        bi, ni = bn // n_chunks, bn % n_chunks
        rows = pl.ds(pl.multiple_of(ni * c, c), c)

        def v_copy(j):
            cols = pl.ds(j * VALUE_BLOCK, VALUE_BLOCK)
            plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, rows, cols], v_r.at[j % 2], v_bar.at[j])

        for src, dst in ((q_ref.at[bi, hi, rows, :], q_s), (k_ref.at[bi, hi, rows, :], k_s),
                         (kt_ref.at[bi, hi, :, rows], kt_s), (tok_ref.at[bi, hi, :, rows], tok_s),
                         (beta_ref.at[bi, hi, rows], beta_s), (ids_ref, ids_s)):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        v_copy(0)
        plgpu.barrier_wait(bar)

        def product(x, y):
            """``x @ y`` of two fp32 ``[C, C]`` register tiles."""
            xs, ys = _stage(x, xh_s, xl_s), _stage(y, yh_s, yl_s)
            plgpu.commit_smem()
            return _mm((c, c), xs, ys)

        def ids(level, axis):
            return _bcast(lane.vec(ids_s.at[level], axis), (c, c), axis)

        gamma, eye = _gamma(lane, tok_s, (c, c), False)
        _stage_out(_matmul((c, c), q_s, kt_s) * gamma * cfg.scale, p_s, p_ref.at[bi, hi, rows, :])
        beta_rows = _bcast(lane.vec(beta_s, 1), (c, c), 1)
        a = jnp.where(eye, 0.0, beta_rows * _matmul((c, c), k_s, kt_s) * gamma)
        t = jnp.where(eye, 1.0, -jnp.where(ids(1, 1) == ids(1, 0), a, 0.0))  # T₂ = I − A⁽¹⁾
        for level in range(1, c.bit_length() - 1):  # merge s = 2^level blocks into 2s blocks
            lower_left = (ids(level + 1, 1) == ids(level + 1, 0)) & (ids(level, 1) != ids(level, 0))
            t = t - product(t, product(jnp.where(lower_left, a, 0.0), t))
        if t_ref is not None:
            _stage_out(t, t_s, t_ref.at[bi, hi, rows, :])
        beta_cols = _bcast(lane.vec(beta_s, 0), (c, c), 0)
        wq_cols = _bcast(lane.vec(tok_s.at[ROW_WQ], 0), (c, c), 0)
        tw = _stage(t * (beta_cols * wq_cols), xh_s, xl_s)
        plgpu.commit_smem()
        _stage_out(_mm((c, dk), tw, (k_s,)), w_s, w_ref.at[bi, hi, rows, :])
        tb = _stage(t * beta_cols, xh_s, xl_s)
        plgpu.commit_smem()
        for j in range(nvb):
            if j + 1 < nvb:
                v_copy(j + 1)  # slot (j + 1) % 2 was last read by block j − 1's wgmma, which has returned
            plgpu.barrier_wait(v_bar.at[j])
            u = _mm((c, VALUE_BLOCK), tb, (v_r.at[j % 2],))
            plgpu.wait_smem_to_gmem(0)  # the previous block's U is out of the staging tile
            # (_stage_out's commit_smem also fences this block's reads of its V slot before the next TMA write)
            _stage_out(u, u_s, u_ref.at[bi, hi, rows, pl.ds(j * VALUE_BLOCK, VALUE_BLOCK)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((c, dk), dt, mma=True),  # Q
        _smem((c, dk), dt, mma=True),  # K
        _smem((dk, c), dt, mma=True),  # Kᵀ
        _smem((2, c, VALUE_BLOCK), dt, mma=True),  # V blocks, 2-slot ring
        _smem((TOK_ROWS, c), F32),  # token rows
        _smem((c,), F32),  # β
        _smem((c.bit_length(), c), F32),  # block ids
        _smem((c, c), dt, mma=True),  # left factor, high part
        _smem((c, c), dt, mma=True),  # left factor, low part
        _smem((c, c), dt, mma=True),  # right factor, high part
        _smem((c, c), dt, mma=True),  # right factor, low part
        _smem((c, VALUE_BLOCK), F32),  # U staging
        _smem((c, dk), F32),  # W staging
        _smem((c, c), F32),  # P staging
        _smem((c, c), F32),  # T staging
        plgpu.Barrier(num_arrivals=6, num_barriers=1),
        plgpu.Barrier(num_arrivals=1, num_barriers=nvb),  # one per V block
    ]
    out = [jax.ShapeDtypeStruct((b, h, tp, dv), F32), jax.ShapeDtypeStruct((b, h, tp, dk), F32),
           jax.ShapeDtypeStruct((b, h, tp, c), F32)]
    if save_t:
        out.append(jax.ShapeDtypeStruct((b, h, tp, c), F32))
    return _kernel(body, out, scratch, name="seqmix_delta_wy", grid=(h, b * n_chunks), grid_names=("h", "bn"),
                   compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        q, k, kt, v, tok, beta, id_rows)


# ----------------------------------------------------------------------------- backward kernels


def _bwd_t_call(cfg: WYConfig, t, k, v, du, dw, dp, tok, beta):
    """The backward through U, W and the inverse, one CTA per chunk (``seqmix_delta_wy_bwd_t``).

    With ``Tb = T diag(β)``, ``Tw = T diag(β ⊙ wq)``: ``dV = β ⊙_rows (Tᵀ dU)``, ``dK_w = (β ⊙ wq) ⊙_rows
    (Tᵀ dW)``, ``dT = (dU Vᵀ) ⊙_cols β + (dW Kᵀ) ⊙_cols (β ⊙ wq)``, ``dA = −Tᵀ dT Tᵀ`` without the diagonal,
    and per token ``Σ_d V ⊙ Tᵀ dU``, ``Σ_d K ⊙ Tᵀ dW`` (the β and wq gradients through U and W). It also
    multiplies the score gradients by Γ for :func:`_bwd_k_call`, which then needs no Γ: it returns
    ``dA ⊙ Γ`` and ``dS = scale · dP ⊙ Γ``. Only
    ``Tᵀ`` (XLA-transposed per chunk) is an operand. dU and dW are visited in 64-column blocks, each loaded
    into one set of SMEM tiles with its own barrier, and the side's ``X Yᵀ`` products accumulate in one
    ``wgmma`` accumulator across its blocks.

    Returns ``dv [B, H, Tp, Dv]``, ``dk_w [B, H, Tp, Dk]``, ``dA ⊙ Γ``, ``dS [B, H, Tp, C]`` and the two
    per-token sums ``[B, H, 2, Tp]``, fp32."""
    b, h, tp, dk = k.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n_chunks = tp // c
    dt = k.dtype
    lane = _Lane(cfg.interpret is not None)
    tt = chunk_transpose(t, c)
    kt, vt = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)
    sides = (dv // VALUE_BLOCK, dk // VALUE_BLOCK)  # blocks of the U side (dU, V), then the W side (dW, K)
    n_blocks = sum(sides)

    def body(tt_ref, du_ref, v_ref, vt_ref, dw_ref, k_ref, kt_ref, dp_ref, tok_ref, beta_ref,
             dv_ref, dkw_ref, da_ref, ds_ref, sums_ref,
             tt_s, tth_s, ttl_s, x_s, y_s, yt_s, xh_s, xl_s, out_s, da_s, dp_s, sum0_s, sum1_s, tok_s, beta_s,
             bar, block_bar):
        hi, bn = lax.axis_index("h"), lax.axis_index("bn")
        bi, ni = bn // n_chunks, bn % n_chunks
        rows = pl.ds(pl.multiple_of(ni * c, c), c)
        refs = ((du_ref, v_ref, vt_ref, dv_ref), (dw_ref, k_ref, kt_ref, dkw_ref))

        def block_copy(side, j, i):
            x_ref, y_ref, yt_ref, _ = refs[side]
            cols = pl.ds(j * VALUE_BLOCK, VALUE_BLOCK)
            for src, dst in ((x_ref.at[bi, hi, rows, cols], x_s), (y_ref.at[bi, hi, rows, cols], y_s),
                             (yt_ref.at[bi, hi, cols, rows], yt_s)):
                plgpu.copy_gmem_to_smem(src, dst, block_bar.at[i])

        for src, dst in ((tt_ref.at[bi, hi, rows, :], tt_s), (dp_ref.at[bi, hi, rows, :], dp_s),
                         (tok_ref.at[bi, hi, :, rows], tok_s), (beta_ref.at[bi, hi, rows], beta_s)):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        block_copy(0, 0, 0)
        plgpu.barrier_wait(bar)
        tt_op = _stage(tile(lane, tt_s), tth_s, ttl_s)
        beta_r, beta_c = lane.vec(beta_s, 1), lane.vec(beta_s, 0)
        scale_rows = (beta_r, beta_r * lane.vec(tok_s.at[ROW_WQ], 1))
        scale_cols = (beta_c, beta_c * lane.vec(tok_s.at[ROW_WQ], 0))
        d_t = None
        i = 0
        for side, n_side in enumerate(sides):
            def side_blocks(acc_ref, side=side, n_side=n_side, first=i):
                total = None
                for j in range(n_side):
                    if first + j:
                        plgpu.commit_smem()  # the previous block's reads of these tiles before the TMA writes
                        block_copy(side, j, first + j)
                    plgpu.barrier_wait(block_bar.at[first + j])
                    x_op = _stage(tile(lane, x_s), xh_s, xl_s)
                    plgpu.commit_smem()
                    g = _mm((c, VALUE_BLOCK), tt_op, x_op)  # Tᵀ X
                    plgpu.wait_smem_to_gmem(0)  # the previous block's output is out of the staging tile
                    _stage_out(_bcast(scale_rows[side], (c, VALUE_BLOCK), 1) * g, out_s,
                               refs[side][3].at[bi, hi, rows, pl.ds(j * VALUE_BLOCK, VALUE_BLOCK)])
                    part = jnp.sum(tile(lane, y_s).astype(F32) * g, axis=1)
                    total = part if total is None else total + part
                    for pair in _pairs(x_op, (yt_s,)):  # X Yᵀ, summed over the side's blocks
                        plgpu.wgmma(acc_ref, *pair)
                    plgpu.wgmma_wait(0)  # this block's tiles are read before the next block's copies
                return total, acc_ref[...]

            total, x_yt = pl.run_scoped(side_blocks, plgpu.ACC((c, c), F32))
            (sum0_s if side == 0 else sum1_s)[...] = total
            term = x_yt * _bcast(scale_cols[side], (c, c), 0)
            d_t = term if d_t is None else d_t + term
            i += n_side
        op = _stage(d_t, xh_s, xl_s)
        plgpu.commit_smem()
        op = _stage(_mm((c, c), tt_op, op), xh_s, xl_s)  # Tᵀ dT
        plgpu.commit_smem()
        gamma, eye = _gamma(lane, tok_s, (c, c), False)
        _stage_out(jnp.where(eye, 0.0, -_mm((c, c), op, tt_op)) * gamma, da_s, da_ref.at[bi, hi, rows, :])
        plgpu.wait_smem_to_gmem(0)  # the last dV / dK_w block is out of its staging tile
        _stage_out(tile(lane, dp_s) * gamma * cfg.scale, dp_s, ds_ref.at[bi, hi, rows, :])
        plgpu.copy_smem_to_gmem(sum0_s, sums_ref.at[bi, hi, 0, rows])
        plgpu.copy_smem_to_gmem(sum1_s, sums_ref.at[bi, hi, 1, rows])
        plgpu.wait_smem_to_gmem(0)

    vb = VALUE_BLOCK
    scratch = [
        _smem((c, c), F32, mma=True),  # Tᵀ (swizzled: loaded as a WGMMA tile)
        _smem((c, c), dt, mma=True), _smem((c, c), dt, mma=True),  # Tᵀ, high and low parts
        _smem((c, vb), F32, mma=True),  # a block of dU / dW
        _smem((c, vb), dt, mma=True), _smem((vb, c), dt, mma=True),  # that block of V / K and its transpose
        _smem((c, c), dt, mma=True), _smem((c, c), dt, mma=True),  # staged operand (a block is C×64 = C×C)
        _smem((c, vb), F32),  # dV / dK_w staging
        _smem((c, c), F32),  # dA ⊙ Γ staging
        _smem((c, c), F32, mma=True),  # dP, then dS staging
        _smem((c,), F32), _smem((c,), F32),  # the per-token sums
        _smem((TOK_ROWS, c), F32),
        _smem((c,), F32),  # β
        plgpu.Barrier(num_arrivals=4, num_barriers=1),
        plgpu.Barrier(num_arrivals=3, num_barriers=n_blocks),
    ]
    out = [jax.ShapeDtypeStruct((b, h, tp, dv), F32), jax.ShapeDtypeStruct((b, h, tp, dk), F32),
           jax.ShapeDtypeStruct((b, h, tp, c), F32), jax.ShapeDtypeStruct((b, h, tp, c), F32),
           jax.ShapeDtypeStruct((b, h, 2, tp), F32)]
    return _kernel(body, out, scratch, name="seqmix_delta_wy_bwd_t", grid=(h, b * n_chunks),
                   grid_names=("h", "bn"), compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        tt, du, v, vt, dw, k, kt, dp, tok, beta)


def _bwd_k_call(cfg: WYConfig, q, k, da_g, ds, beta):
    """The backward through ``A = β_i (K Kᵀ)_ij Γ_ij`` and ``P = scale (Q Kᵀ ⊙ Γ)``, one CTA per chunk
    (``seqmix_delta_wy_bwd_k``), from ``dA ⊙ Γ`` and ``dS = scale · dP ⊙ Γ`` (:func:`_bwd_t_call`).

    ``dKK = β ⊙_rows (dA ⊙ Γ)``: ``dK = (dKK + dKKᵀ) K + dSᵀ Q``, ``dQ = dS K``,
    ``dβ_i = Σ_j (dA ⊙ Γ)_ij (K Kᵀ)_ij`` and ``dG_i = Σ_j X_ij − Σ_j X_ji`` with
    ``X = dKK ⊙ K Kᵀ + dS ⊙ Q Kᵀ`` (the gradient through ``Γ_ij = exp(G_i − G_j)``); the transposed terms
    come from XLA-transposed copies of both inputs. Returns ``dq``, ``dk [B, H, Tp, Dk]`` and ``dβ``,
    ``dG [B, H, Tp]``, fp32."""
    b, h, tp, dk = k.shape
    c = cfg.chunk
    n_chunks = tp // c
    dt = k.dtype
    lane = _Lane(cfg.interpret is not None)
    qt, kt = jnp.swapaxes(q, 2, 3), jnp.swapaxes(k, 2, 3)
    da_gt, dst = chunk_transpose(da_g, c), chunk_transpose(ds, c)

    def body(q_ref, qt_ref, k_ref, kt_ref, da_ref, dat_ref, ds_ref, dst_ref, beta_ref, dq_ref, dk_ref, db_ref, dg_ref,
             q_s, qt_s, k_s, kt_s, da_s, dat_s, ds_s, dst_s, beta_s, xh_s, xl_s, yh_s, yl_s, zh_s, zl_s, out_s,
             db_s, dg_s, bar):
        hi, bn = lax.axis_index("h"), lax.axis_index("bn")
        bi, ni = bn // n_chunks, bn % n_chunks
        rows = pl.ds(pl.multiple_of(ni * c, c), c)
        for src, dst in ((q_ref.at[bi, hi, rows, :], q_s), (qt_ref.at[bi, hi, :, rows], qt_s),
                         (k_ref.at[bi, hi, rows, :], k_s), (kt_ref.at[bi, hi, :, rows], kt_s),
                         (da_ref.at[bi, hi, rows, :], da_s), (dat_ref.at[bi, hi, rows, :], dat_s),
                         (ds_ref.at[bi, hi, rows, :], ds_s), (dst_ref.at[bi, hi, rows, :], dst_s),
                         (beta_ref.at[bi, hi, rows], beta_s)):
            plgpu.copy_gmem_to_smem(src, dst, bar)
        plgpu.barrier_wait(bar)
        # One [C, Dk] output accumulator at a time, dQ first (dQ's beside the dK terms spilled).
        d_s = tile(lane, ds_s)
        dg = jnp.sum(d_s * _matmul((c, c), q_s, kt_s), axis=1)
        ds_op = _stage(d_s, yh_s, yl_s)
        plgpu.commit_smem()
        _stage_out(_mm((c, dk), ds_op, (k_s,)), out_s, dq_ref.at[bi, hi, rows, :])  # dQ = dS K
        kk = _matmul((c, c), k_s, kt_s)  # symmetric: also (K Kᵀ)ᵀ
        d_ag = tile(lane, da_s)
        db_s[...] = jnp.sum(d_ag * kk, axis=1)
        d_kk = _bcast(lane.vec(beta_s, 1), (c, c), 1) * d_ag
        dg = dg + jnp.sum(d_kk * kk, axis=1)
        dkk_op = _stage(d_kk, xh_s, xl_s)
        d_kkt = _bcast(lane.vec(beta_s, 0), (c, c), 0) * tile(lane, dat_s)
        dg = dg - jnp.sum(d_kkt * kk, axis=1)
        dkkt_op = _stage(d_kkt, zh_s, zl_s)
        d_st = tile(lane, dst_s)
        dg = dg - jnp.sum(d_st * _matmul((c, c), k_s, qt_s), axis=1)
        dst_op = _stage(d_st, yh_s, yl_s)  # dS's tiles: its wgmma has returned
        plgpu.commit_smem()
        dk_acc = matmul_sum((c, dk), *_pairs(dkk_op, (k_s,)), *_pairs(dkkt_op, (k_s,)), *_pairs(dst_op, (q_s,)))
        plgpu.wait_smem_to_gmem(0)  # dQ is out of the staging tile
        _stage_out(dk_acc, out_s, dk_ref.at[bi, hi, rows, :])
        dg_s[...] = dg
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(db_s, db_ref.at[bi, hi, rows])
        plgpu.copy_smem_to_gmem(dg_s, dg_ref.at[bi, hi, rows])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        _smem((c, dk), dt, mma=True), _smem((dk, c), dt, mma=True),  # Q, Qᵀ
        _smem((c, dk), dt, mma=True), _smem((dk, c), dt, mma=True),  # K, Kᵀ
        *(_smem((c, c), F32, mma=True) for _ in range(4)),  # dA ⊙ Γ, its transpose, dS, dSᵀ
        _smem((c,), F32),  # β
        *(_smem((c, c), dt, mma=True) for _ in range(6)),  # staged operands: dKK, dS (then dSᵀ), dKKᵀ
        _smem((c, dk), F32),  # dQ / dK staging
        _smem((c,), F32), _smem((c,), F32),  # dβ, dG
        plgpu.Barrier(num_arrivals=9, num_barriers=1),
    ]
    out = [jax.ShapeDtypeStruct((b, h, tp, dk), F32), jax.ShapeDtypeStruct((b, h, tp, dk), F32),
           jax.ShapeDtypeStruct((b, h, tp), F32), jax.ShapeDtypeStruct((b, h, tp), F32)]
    return _kernel(body, out, scratch, name="seqmix_delta_wy_bwd_k", grid=(h, b * n_chunks),
                   grid_names=("h", "bn"), compiler_params=_compiler_params(cfg), interpret=cfg.interpret)(
        q, qt, k, kt, da_g, da_gt, ds, dst, beta)


# ----------------------------------------------------------------------------- custom_vjp


def _check(cfg: WYConfig, q, k, v, tok, beta):
    b, h, tp, dk = k.shape
    c = cfg.chunk
    if c != 64:
        raise ValueError(f"chunk must be 64 (the wgmma M of one warpgroup); got {c}")
    if tp % c:
        raise ValueError(f"Tp={tp} must be a multiple of the chunk {c}; pad first")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"bad shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    if dk % 64 or dk > MAX_TMA_BOX:
        raise ValueError(f"Dk={dk} must be a multiple of 64 and <= {MAX_TMA_BOX}")
    if v.shape[-1] % VALUE_BLOCK:
        raise ValueError(f"Dv={v.shape[-1]} must be a multiple of {VALUE_BLOCK}")
    if tok.shape != (b, h, TOK_ROWS, tp) or beta.shape != (b, h, tp):
        raise ValueError(f"tok must be {(b, h, TOK_ROWS, tp)}, beta {(b, h, tp)}; got {tok.shape}, {beta.shape}")
    for name, x in (("q", q), ("k", k), ("v", v), ("tok", tok), ("beta", beta)):
        if x.dtype != F32:
            raise ValueError(f"{name} must be float32 (cast to cfg.dtype inside); got {x.dtype}")


def _operands(cfg: WYConfig, *xs):
    return tuple(x.astype(cfg.dtype) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wy(cfg: WYConfig, q, k, v, tok, beta):
    """``(u [B, H, Tp, Dv], w [B, H, Tp, Dk], p [B, H, Tp, C])`` fp32 (module docstring), kernel layout.
    q, k, v fp32 (cast to ``cfg.dtype`` here), tok / beta fp32; differentiable in q, k, v, β and the
    token rows G and wq."""
    _check(cfg, q, k, v, tok, beta)
    return tuple(_fwd_call(cfg, *_operands(cfg, q, k, v), tok, beta, save_t=False))


def _vjp_fwd(cfg, q, k, v, tok, beta):
    _check(cfg, q, k, v, tok, beta)
    ops = _operands(cfg, q, k, v)
    u, w, p, t = _fwd_call(cfg, *ops, tok, beta, save_t=True)
    return (u, w, p), (*ops, tok, beta, t)


def _vjp_bwd(cfg, res, cts):
    q, k, v, tok, beta, t = res
    du, dw, dp = cts
    dv, dk_w, da_g, ds, sums = _bwd_t_call(cfg, t, k, v, du, dw, dp, tok, beta)
    dq, dk_a, db_a, dg = _bwd_k_call(cfg, q, k, da_g, ds, beta)
    wq = tok[:, :, ROW_WQ]
    dtok = jnp.zeros_like(tok).at[:, :, ROW_G].set(dg).at[:, :, ROW_WQ].set(beta * sums[:, :, 1])
    return dq, dk_w + dk_a, dv, dtok, sums[:, :, 0] + wq * sums[:, :, 1] + db_a


wy.defvjp(_vjp_fwd, _vjp_bwd)


# ----------------------------------------------------------------------------- the state pass's operands


class StatePassOperands(NamedTuple):
    """The operands of :func:`pallas_kernels.gpu.delta_rule.state_pass`, every gate, β and segment factor
    folded in: per chunk ``V_new = U − W S``, ``O = Qg S + P V_new``, ``S ← a ⊙_rows S + Kdᵀ V_new``.
    Kernel layout ``[B, H, Tp, ·]`` fp32, ``Tp = N·C``."""

    qg: Any  # [B, H, Tp, Dk] scale · Q ⊙ exp(G), zero after the chunk's first reset
    p: Any  # [B, H, Tp, C] scale · (Q Kᵀ ⊙ Γ), chunk n's C×C block in rows n·C …
    kd: Any  # [B, H, Tp, Dk] K ⊙ exp(G_C − G), zero before the chunk's last reset
    u: Any  # [B, H, Tp, Dv] T (β ⊙ V)
    w: Any  # [B, H, Tp, Dk] T (β ⊙ exp(G) ⊙ K)
    a: Any  # [B, H, N, Dk] exp(G_C) per state row, 0 for a chunk with a reset


def state_pass_operands(cfg: WYConfig, q, k, v, beta, g=None, resets=None) -> StatePassOperands:
    """The WY part in API layout: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (Dv a multiple of 64), beta
    ``[B, T, H]``, g ``[B, T, H]`` log decay or None (DeltaNet), resets bool ``[B, T]`` or None. T is zero
    padded to whole chunks (padding tokens: β = 0, g = 0, k = 0, which leave the state unchanged). The
    per-token gate factors are plain jnp (differentiated by JAX); A, T, U, W, P are the kernel."""
    b, t, h, dk = k.shape
    c = cfg.chunk
    tp = -(-t // c) * c
    gk = None if g is None else _to_kernel(bounded_log_gate(g), tp)
    rk = None if resets is None else jnp.pad(jnp.asarray(resets, bool), [(0, 0), (0, tp - t)])
    tok, a = chunk_lanes(gk, rk, b, h, tp, dk, c)
    qk, kk, vk = (_to_kernel(jnp.asarray(x, F32), tp) for x in (q, k, v))
    u, w, p = wy(cfg, qk, kk, vk, tok, _to_kernel(jnp.asarray(beta, F32), tp))
    qg = qk * (cfg.scale * tok[:, :, ROW_WQ, :, None])
    kd = kk * tok[:, :, ROW_WK, :, None]
    return StatePassOperands(qg, p, kd, u, w, a)
