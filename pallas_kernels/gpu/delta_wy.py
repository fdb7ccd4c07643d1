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
operands. Each fp32 factor ``x`` is split as ``hi = bf16(x)``, ``lo = bf16(x − hi)`` (16 significant
bits) and ``x y ≈ hi·y_hi + hi·y_lo + lo·y_hi`` (three ``wgmma``, fp32 accumulator); ``U``, ``W`` take
``T diag(·)`` split against the exact 16-bit ``V``, ``K`` (two ``wgmma``). The relative error of the
operands (about 2⁻¹⁶) is far below that of the 16-bit inputs (2⁻⁸). In the interpreter with fp32
operands, each product is one exact fp32 ``wgmma``.

Kernel layout ``[B, H, Tp, ·]``, ``Tp = N·C``: ``q, k [B, H, Tp, Dk]``, ``v [B, H, Tp, Dv]`` (the
``wgmma`` operand dtype), ``kT`` (XLA-transposed, so that every ``wgmma`` operand is a row-major SMEM
tile), the token rows ``tok [B, H, 5, Tp]`` of :func:`pallas_kernels.gpu.gated_linear.chunk_lanes`, β
``[B, H, Tp]`` fp32 and the block ids ``[log₂ C + 1, C]`` (``pos // 2ˡ``). Outputs fp32: ``u [B, H, Tp,
Dv]``, ``w [B, H, Tp, Dk]``, ``p [B, H, Tp, C]`` (chunk n's P in rows ``n·C …``) and, for the backward,
``t`` alike. Grid ``(H, B·N)``, one warpgroup per CTA; V in 64-column blocks through a 2-slot ring.

The backward (:func:`_wy_grads`) is batched matmuls in XLA from the saved ``T``: ``dA = −Tᵀ dT Tᵀ`` and
the chain rule through ``A``, ``Γ``, β and ``wq`` (no autodiff through the inverse). Raw kernel plus its
``custom_vjp``; nothing from ``seqmix`` is imported.
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
from pallas_kernels.gpu.flash_attention import MAX_TMA_BOX, _bcast, _kernel, _Lane, _matmul, _smem, plgpu
from pallas_kernels.gpu.gated_linear import (
    ROW_G,
    ROW_POS,
    ROW_START,
    ROW_WK,
    ROW_WQ,
    TOK_ROWS,
    _gamma,
    _to_kernel,
    chunk_lanes,
)

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
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


def smem_bytes(chunk: int, dk: int, dtype) -> int:
    """SMEM the kernel allocates (buffers only), to check against the H100's 227 KiB (any Dv)."""
    it = jnp.dtype(dtype).itemsize
    c = chunk
    inputs = (3 * c * dk + 2 * c * VALUE_BLOCK) * it + (TOK_ROWS + 1 + c.bit_length()) * c * 4
    split = 4 * c * c * it
    staging = (c * VALUE_BLOCK + c * dk + 2 * c * c) * 4
    return inputs + split + staging


# ----------------------------------------------------------------------------- forward kernel


def _fwd_call(cfg: WYConfig, q, k, v, tok, beta, save_t: bool):
    b, h, tp, dk = k.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n_chunks, nvb = tp // c, dv // VALUE_BLOCK
    dt = k.dtype
    exact = dt == F32  # interpreter fp32: one exact product, no hi / lo split
    lane = _Lane(cfg.interpret is not None)
    kt = jnp.swapaxes(k, 2, 3)
    ids = block_ids(c)

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

        def split(x, hi_s, lo_s):
            """Stage fp32 ``x`` as its operand-dtype high part (and the low part, unless exact)."""
            x_hi = x.astype(dt)
            hi_s[...] = x_hi
            if not exact:
                lo_s[...] = (x - x_hi.astype(F32)).astype(dt)

        def product(x, y):
            """``x @ y`` of two fp32 ``[C, C]`` register tiles (hi·hi + hi·lo + lo·hi)."""
            split(x, xh_s, xl_s)
            split(y, yh_s, yl_s)
            plgpu.commit_smem()
            pairs = [(xh_s, yh_s)] if exact else [(xh_s, yh_s), (xh_s, yl_s), (xl_s, yh_s)]
            return matmul_sum((c, c), *pairs)

        def times_exact(x, y_ref, shape):
            """``x @ y`` with fp32 ``x`` (split) and an operand-dtype SMEM tile ``y_ref``."""
            split(x, xh_s, xl_s)
            plgpu.commit_smem()
            return matmul_sum(shape, *([(xh_s, y_ref)] if exact else [(xh_s, y_ref), (xl_s, y_ref)]))

        def ids(level, axis):
            return _bcast(lane.vec(ids_s.at[level], axis), (c, c), axis)

        def stage_out(x, smem, dst):
            smem[...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, dst)

        gamma, eye = _gamma(lane, tok_s, (c, c), False)
        stage_out(_matmul((c, c), q_s, kt_s) * gamma * cfg.scale, p_s, p_ref.at[bi, hi, rows, :])
        beta_rows = _bcast(lane.vec(beta_s, 1), (c, c), 1)
        a = jnp.where(eye, 0.0, beta_rows * _matmul((c, c), k_s, kt_s) * gamma)
        t = jnp.where(eye, 1.0, -jnp.where(ids(1, 1) == ids(1, 0), a, 0.0))  # T₂ = I − A⁽¹⁾
        for level in range(1, c.bit_length() - 1):  # merge s = 2^level blocks into 2s blocks
            lower_left = (ids(level + 1, 1) == ids(level + 1, 0)) & (ids(level, 1) != ids(level, 0))
            t = t - product(t, product(jnp.where(lower_left, a, 0.0), t))
        if t_ref is not None:
            stage_out(t, t_s, t_ref.at[bi, hi, rows, :])
        beta_cols = _bcast(lane.vec(beta_s, 0), (c, c), 0)
        wq_cols = _bcast(lane.vec(tok_s.at[ROW_WQ], 0), (c, c), 0)
        stage_out(times_exact(t * (beta_cols * wq_cols), k_s, (c, dk)), w_s, w_ref.at[bi, hi, rows, :])
        split(t * beta_cols, xh_s, xl_s)
        plgpu.commit_smem()
        for j in range(nvb):
            if j + 1 < nvb:
                v_copy(j + 1)  # slot (j + 1) % 2 was last read by block j − 1's wgmma, which has returned
            plgpu.barrier_wait(v_bar.at[j])
            v_s = v_r.at[j % 2]
            u = matmul_sum((c, VALUE_BLOCK), *([(xh_s, v_s)] if exact else [(xh_s, v_s), (xl_s, v_s)]))
            plgpu.wait_smem_to_gmem(0)  # the previous block's U is out of the staging tile
            # (stage_out's commit_smem also fences this block's reads of its V slot before the next TMA write)
            stage_out(u, u_s, u_ref.at[bi, hi, rows, pl.ds(j * VALUE_BLOCK, VALUE_BLOCK)])
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
        q, k, kt, v, tok, beta, ids)


# ----------------------------------------------------------------------------- backward (XLA)


def _chunk_gates(tok, c: int):
    """Γ ``[B, H, N, C, C]`` (fp32) and the strictly-lower same-segment mask, from the token rows (the
    kernel's :func:`pallas_kernels.gpu.gated_linear._gamma` in jnp)."""
    b, h, _, tp = tok.shape
    rows = tok.reshape(b, h, TOK_ROWS, tp // c, c)
    g, start, pos = (rows[:, :, r] for r in (ROW_G, ROW_START, ROW_POS))
    ok = (pos[..., None, :] <= pos[..., :, None]) & (pos[..., None, :] >= start[..., :, None])
    gamma = jnp.exp(jnp.where(ok, g[..., :, None] - g[..., None, :], -jnp.inf))
    strict = ok & (pos[..., None, :] != pos[..., :, None])
    return gamma, strict


def _wy_grads(cfg: WYConfig, q, k, v, tok, beta, t, du, dw, dp):
    """Gradients of ``(u, w, p)`` in q, k, v, β and the token rows G, wq (fp32, kernel layout), from the
    saved ``T``. With ``Tb = T diag(β)``, ``Tw = T diag(β ⊙ wq)``:
    ``dV = Tbᵀ dU``, ``dK ⊇ Twᵀ dW``, ``dT = (dU Vᵀ) diag(β) + (dW Kᵀ) diag(β ⊙ wq)``,
    ``dA = −Tᵀ dT Tᵀ`` on the strictly lower same-segment entries, then through ``A = β_i (K Kᵀ)_ij Γ_ij``
    and ``P = scale (Q Kᵀ ⊙ Γ)``; ``Γ_ij = exp(G_i − G_j)`` gives ``dG_i += Σ_j dΓ_ij Γ_ij``,
    ``dG_j −= Σ_i dΓ_ij Γ_ij``."""
    b, h, tp, dk = k.shape
    c = cfg.chunk
    n = tp // c

    def mm(spec, *xs):
        return jnp.einsum(spec, *xs, precision=HIGHEST, preferred_element_type=F32)

    ch = lambda x: x.astype(F32).reshape(b, h, n, c, x.shape[-1])  # noqa: E731
    q, k, v, t, du, dw, dp = map(ch, (q, k, v, t, du, dw, dp))
    beta = beta.reshape(b, h, n, c)
    wq = tok.reshape(b, h, TOK_ROWS, n, c)[:, :, ROW_WQ]
    gamma, strict = _chunk_gates(tok, c)
    bw = beta * wq
    d_tb = mm("...id,...jd->...ij", du, v)  # dU Vᵀ
    d_tw = mm("...id,...jd->...ij", dw, k)  # dW Kᵀ
    dv = beta[..., None] * mm("...ij,...id->...jd", t, du)
    dk = bw[..., None] * mm("...ij,...id->...jd", t, dw)
    dbeta = jnp.sum(t * d_tb, axis=-2) + wq * jnp.sum(t * d_tw, axis=-2)
    dwq = beta * jnp.sum(t * d_tw, axis=-2)
    d_t = d_tb * beta[..., None, :] + d_tw * bw[..., None, :]
    d_a = jnp.where(strict, -mm("...ki,...kl,...jl->...ij", t, d_t, t), 0.0)
    kk = mm("...id,...jd->...ij", k, k)
    d_kk = d_a * beta[..., :, None] * gamma
    dk = dk + mm("...ij,...jd->...id", d_kk, k) + mm("...ji,...jd->...id", d_kk, k)
    dbeta = dbeta + jnp.sum(d_a * kk * gamma, axis=-1)
    ds = dp * gamma * cfg.scale
    dq = mm("...ij,...jd->...id", ds, k)
    dk = dk + mm("...ij,...id->...jd", ds, q)
    qk = mm("...id,...jd->...ij", q, k)
    d_gamma_x_gamma = (d_a * beta[..., :, None] * kk + dp * cfg.scale * qk) * gamma
    dg = jnp.sum(d_gamma_x_gamma, axis=-1) - jnp.sum(d_gamma_x_gamma, axis=-2)
    flat = lambda x: x.reshape(b, h, tp, -1)  # noqa: E731
    dtok = jnp.zeros((b, h, TOK_ROWS, n, c), F32).at[:, :, ROW_G].set(dg).at[:, :, ROW_WQ].set(dwq)
    return flat(dq), flat(dk), flat(dv), dtok.reshape(b, h, TOK_ROWS, tp), dbeta.reshape(b, h, tp)


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
    return _wy_grads(cfg, *res, *cts)


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
