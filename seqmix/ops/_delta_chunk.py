"""The chunked WY/UT algorithm shared by ``delta_rule`` and ``gated_delta_rule`` (FAMILIES.md §2.7).

One algorithm: DeltaNet is Gated DeltaNet with ``g = 0``. Per chunk of C tokens, with start state S,
``G`` the chunk-local fp32 cumsum of g (restarting at segment resets) and
``Γ_ij = exp(G_i − G_j)`` masked (in log space) to ``i >= j`` in the same segment::

    A     = tril(diag(β) (K Kᵀ ⊙ Γ), −1)          T = (I + A)⁻¹   (fp32, blocked forward substitution)
    U     = T (β ⊙ V)                              W = T (β ⊙ exp(G) ⊙ K)
    V_new = U − W S
    O     = (Q ⊙ exp(G)) S + (Q Kᵀ ⊙ Γ) V_new
    S'    = exp(G_C) S + (K ⊙ exp(G_C − G))ᵀ V_new  =  M S + S_ext

The chunk-parallel parts (A, T, U, W) are computed for every chunk at once; only the state pass
(two small matmuls per chunk) is a sequential ``lax.scan`` with an fp32 carry. The backward is a
hand-written ``jax.custom_vjp``: its residuals are the inputs and the chunk-start states (one state
per chunk, never one per token); A, T, U, W are recomputed and the state cotangent runs through a
reverse scan (§2.7 "Chunk backward"). On CPU, inputs longer than about ``GROUP_ROW_TOKENS`` tokens × rows
run all of this group by group, with the state carried between groups (:mod:`seqmix.ops._chunk_groups`).

Segment resets: inside a chunk A, Γ and the causal term only couple same-segment pairs; the chunk-start
state reaches only the tokens before the chunk's first reset (``exp(G)`` is zeroed after it), the
chunk-end state only collects the tokens after the last reset (``exp(G_C − G)`` is zeroed before it)
and ``exp(G_C)`` is 0 for a chunk that contains a reset. Padding tokens (``β = 0, g = 0, k = 0``) leave
the state unchanged.

Stability (not enforced here; the layers L2-normalize): the Householder factors ``I − β k kᵀ`` have
eigenvalues in [0, 1] only with ‖k‖ = 1 and β ∈ [0, 1] ((−1, 1] with β ∈ (0, 2)); otherwise the
entries of T and the state grow geometrically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gate_math import bounded_log_gate
from pallas_kernels.gpu.delta_wy import StatePassOperands
from seqmix.ops import _checks, _chunk_groups
from seqmix.ops._recurrent import by_head, from_chunks, resets_to_chunks, rows, to_chunks

Array = Any
HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32

# Diagonal block size of the blocked triangular inverse.
_INV_BLOCK = 16
# Tokens × rows (batch · heads) per group of chunks: on CPU longer inputs run the chunked form one group at a
# time, carrying the state (seqmix/ops/_chunk_groups.py). Interleaved A/B on CPU (2 cores, 32 MiB L3; gated
# delta rule fwd+bwd, B·H = 4, D = 64, ms; no groups / 2048 / 4096 / 8192): T = 2k 72 / 59 / 53 / 66,
# 8k 392 / 240 / 228 / 267, 32k 1421 / 934 / 803 / 845.
GROUP_ROW_TOKENS = 4096


def _mm(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST, preferred_element_type=F32)


# ----------------------------------------------------------------------------- triangular inverse


def _diag_blocks(a, s):
    """Diagonal ``s × s`` blocks of ``a [..., n·s, n·s]`` as ``[..., n, s, s]``."""
    n = a.shape[-1] // s
    x = a.reshape(a.shape[:-2] + (n, s, n, s))
    x = jnp.diagonal(x, axis1=-4, axis2=-2)  # [..., s, s, n]
    return jnp.moveaxis(x, -1, -3)


def tri_inverse(a):
    """``(I + A)⁻¹`` for strictly lower triangular ``a [..., C, C]`` (any C), in fp32.

    Blocked forward substitution (matmuls only, apart from the 16-row substitution inside each diagonal
    block): invert the 16 × 16 diagonal blocks row by row, then merge pairs of blocks with
    ``[[T₁₁, 0], [−T₂₂ A₂₁ T₁₁, T₂₂]]`` up to C. C is padded internally to 16·2^k (identity padding);
    the strictly lower structure of ``a`` is assumed, not checked.
    """
    a = jnp.asarray(a, F32)
    c = a.shape[-1]
    base = min(_INV_BLOCK, 1 << max(0, (c - 1).bit_length()))
    levels = max(0, (-(-c // base) - 1).bit_length())
    cp = base << levels
    if cp != c:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, cp - c), (0, cp - c)])
    blocks = _diag_blocks(a, base)  # [..., m, base, base]
    eye = jnp.eye(base, dtype=F32)
    axis = blocks.ndim - 2

    def substitute(i, t):
        # rows j < i of t are final, rows >= i are still e_j; blocks[..., i, j] = 0 for j >= i
        a_i = jax.lax.dynamic_index_in_dim(blocks, i, axis, keepdims=False)
        e_i = jax.lax.dynamic_index_in_dim(eye, i, 0, keepdims=False)
        row = e_i - _mm("...j,...jk->...k", a_i, t)
        return jax.lax.dynamic_update_index_in_dim(t, row, i, axis)

    t = jax.lax.fori_loop(1, base, substitute, jnp.broadcast_to(eye, blocks.shape))
    s = base
    while s < cp:
        a21 = _diag_blocks(a, 2 * s)[..., s:, :s]  # [..., m/2, s, s]
        t11, t22 = t[..., 0::2, :, :], t[..., 1::2, :, :]
        t21 = -_mm("...ij,...jk,...kl->...il", t22, a21, t11)
        top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
        bottom = jnp.concatenate([t21, t22], axis=-1)
        t = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    t = t[..., 0, :, :]
    return t[..., :c, :c]


# ----------------------------------------------------------------------------- chunk layout


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    scale: float
    group: int  # tokens per group of chunks (seqmix/ops/_chunk_groups.py)
    groups: int


def effective_chunk(t: int, chunk_size: int) -> int:
    """The chunk length used for a sequence of ``t`` tokens: ``min(chunk_size, t)``."""
    return max(1, min(chunk_size, t))


def describe(call) -> str:
    """Registry ``describe`` hook of the chunked XLA implementations."""
    c = effective_chunk(call.q.shape[1], call.chunk_size)
    return f"chunk_size={c}" + (f", requested {call.chunk_size} > seq" if c != call.chunk_size else "")


def _chunk(x, c, n):
    """``[B, T, H, ...]`` -> ``[Z = B·H, N, C, ...]`` fp32, zero padded to N·C tokens (:func:`to_chunks`)."""
    return to_chunks(jnp.asarray(x, F32), c, n)


class _Gates(NamedTuple):
    """Chunk-local decay factors and segment masks (all fp32 / bool, ``[Z = B·H, N, C(, C)]``)."""

    lseg: Array  # [Z,N,C,C] i >= j, same segment
    strict: Array  # [Z,N,C,C] i > j, same segment
    gam: Array  # [Z,N,C,C] exp(G_i - G_j) on lseg, else 0
    eg: Array  # [Z,N,C] exp(G_i) for tokens reached by the chunk-start state, else 0
    dend: Array  # [Z,N,C] exp(G_C - G_j) for tokens in the chunk's last segment, else 0
    gc: Array  # [Z,N] exp(G_C) if the chunk has no reset, else 0


def _gates(g, rst) -> _Gates:
    """``g [Z,N,C]`` (clamped, fp32), ``rst [Z,N,C]`` bool (state restarts before the token)."""
    c = g.shape[-1]
    sid = jnp.cumsum(rst.astype(jnp.int32), axis=-1)  # segment index inside the chunk
    ii = jnp.arange(c)
    lseg = (sid[..., :, None] == sid[..., None, :]) & (ii[:, None] >= ii[None, :])
    strict = lseg & (ii[:, None] > ii[None, :])
    # segmented inclusive cumsum as an exact fp32 masked sum (no matmul precision involved)
    G = jnp.sum(jnp.where(lseg, g[..., None, :], 0.0), axis=-1)
    gam = jnp.exp(jnp.where(lseg, G[..., :, None] - G[..., None, :], -jnp.inf))
    eg = jnp.exp(jnp.where(sid == 0, G, -jnp.inf))
    g_last = G[..., -1]
    dend = jnp.exp(jnp.where(sid == sid[..., -1:], g_last[..., None] - G, -jnp.inf))
    gc = jnp.exp(jnp.where(sid[..., -1] == 0, g_last, -jnp.inf))
    return _Gates(lseg, strict, gam, eg, dend, gc)


class _Chunks(NamedTuple):
    K: Array
    V: Array
    beta: Array
    gt: _Gates
    KK: Array
    T: Array
    Bv: Array
    Bk: Array
    U: Array
    W: Array
    Kd: Array


def _setup(c, n, k, v, g, beta, resets) -> _Chunks:
    """Chunk-parallel part: gates, A, T = (I + A)⁻¹, U, W for every chunk at once."""
    K, V = _chunk(k, c, n), _chunk(v, c, n)
    bt = _chunk(beta, c, n)
    gg = _chunk(jnp.asarray(g, F32), c, n)
    rst = resets_to_chunks(resets, k.shape[2], c, n) > 0  # [Z,N,C]
    gt = _gates(gg, rst)
    KK = _mm("...id,...jd->...ij", K, K)
    A = jnp.where(gt.strict, bt[..., :, None] * KK * gt.gam, 0.0)
    T = tri_inverse(A)
    Bv = bt[..., None] * V
    Bk = (bt * gt.eg)[..., None] * K
    U = _mm("...ij,...jd->...id", T, Bv)
    W = _mm("...ij,...jd->...id", T, Bk)
    Kd = K * gt.dend[..., None]
    return _Chunks(K, V, bt, gt, KK, T, Bv, Bk, U, W, Kd)


def _state_pass(z: _Chunks, s0):
    """Sequential pass over chunks. Returns the chunk-start states ``[Z,N,Dk,Dv]`` and the final state."""

    def body(s, x):
        u, w, kd, a = x
        vn = u - _mm("zcd,zdv->zcv", w, s)
        return a[..., None, None] * s + _mm("zcd,zcv->zdv", kd, vn), s

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (z.U, z.W, z.Kd, z.gt.gc))
    s_final, starts = jax.lax.scan(body, s0, xs)
    return jnp.moveaxis(starts, 0, 1), s_final


def _sizes(chunk: int, t: int):
    c = effective_chunk(t, chunk)
    return c, -(-t // c)


# ----------------------------------------------------------------------------- forward / backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta_core(st: _Static, q, k, v, g, beta, s0, resets):
    return _grouped_fwd(st, q, k, v, g, beta, s0, resets)[0]


def _grouped_fwd(st, q, k, v, g, beta, s0, resets):
    """The chunked form on the whole input (one group) or group by group (:mod:`seqmix.ops._chunk_groups`)."""
    if st.groups == 1:
        return _core_fwd(st, q, k, v, g, beta, s0, resets)

    def step(xs, state):
        qi, ki, vi, gi, bi, ri = xs
        (o, end), res = _core_fwd(st, qi, ki, vi, gi, bi, state, ri)
        return o, end, res[-1]  # the group's chunk-start states

    o, final, saved = _chunk_groups.forward(step, (q, k, v, g, beta, resets), s0, st.group, st.groups)
    return (o, final), (q, k, v, g, beta, s0, resets, saved)


def _grouped_bwd(st, res, cts):
    if st.groups == 1:
        return _core_bwd(st, res, cts)
    q, k, v, g, beta, s0, resets, saved = res
    do, ds_final = cts

    def step(xs, doi, start, _, chunk_starts, ds_end):
        qi, ki, vi, gi, bi, ri = xs
        grads = _core_bwd(st, (qi, ki, vi, gi, bi, start, ri, chunk_starts), (doi, ds_end))
        return grads[:5] + (None,), grads[5]

    (dq, dk, dv, dg, dbeta, _), ds0 = _chunk_groups.backward(step, (q, k, v, g, beta, resets), do, saved,
                                                             jnp.asarray(ds_final, F32), st.group, st.groups)
    dresets = np.zeros(resets.shape, jax.dtypes.float0)
    return dq, dk, dv, dg, dbeta, ds0.astype(s0.dtype), dresets


def _core_fwd(st, q, k, v, g, beta, s0, resets):
    t, h = q.shape[1], q.shape[2]
    c, n = _sizes(st.chunk, t)
    z = _setup(c, n, k, v, g, beta, resets)
    starts, s_final = _state_pass(z, rows(s0))
    Q = _chunk(q, c, n) * st.scale
    vn = z.U - _mm("zncd,zndv->zncv", z.W, starts)
    P = _mm("...id,...jd->...ij", Q, z.K) * z.gt.gam
    O = _mm("zncd,zndv->zncv", Q * z.gt.eg[..., None], starts) + _mm("...ij,...jv->...iv", P, vn)
    return (from_chunks(O, t, h), by_head(s_final, h)), (q, k, v, g, beta, s0, resets, starts)


def _core_bwd(st, res, cts):
    q, k, v, g, beta, s0, resets, starts = res
    do, ds_final = cts
    t, h = q.shape[1], q.shape[2]
    c, n = _sizes(st.chunk, t)
    z = _setup(c, n, k, v, g, beta, resets)
    gt = z.gt
    Q = _chunk(q, c, n) * st.scale
    dO = _chunk(do, c, n)
    vn = z.U - _mm("zncd,zndv->zncv", z.W, starts)
    QK = _mm("...id,...jd->...ij", Q, z.K)
    P = QK * gt.gam
    Kq = Q * gt.eg[..., None]

    # reverse state pass: dS (cotangent of the chunk-end state) -> cotangent of the chunk-start state
    X = _mm("...ji,...jv->...iv", P, dO)  # Pᵀ dO
    Y = _mm("...cd,...cv->...dv", Kq, dO)  # (Q ⊙ exp(G))ᵀ dO

    def body(ds, x):
        xn, yn, kd, w, a = x
        dvn = xn + _mm("zcd,zdv->zcv", kd, ds)
        return yn + a[..., None, None] * ds - _mm("zcd,zcv->zdv", w, dvn), ds

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (X, Y, z.Kd, z.W, gt.gc))
    ds0, dends = jax.lax.scan(body, rows(jnp.asarray(ds_final, F32)), xs, reverse=True)
    dends = jnp.moveaxis(dends, 0, 1)  # [Z,N,Dk,Dv]

    dvn = X + _mm("zncd,zndv->zncv", z.Kd, dends)
    dP = _mm("...iv,...jv->...ij", dO, vn)
    dKq = _mm("...cv,...dv->...cd", dO, starts)
    dKd = _mm("...cv,...dv->...cd", vn, dends)
    dgc = jnp.sum(starts * dends, axis=(-2, -1))
    dU = dvn
    dW = -_mm("...cv,...dv->...cd", dvn, starts)
    dT = _mm("...iv,...jv->...ij", dU, z.Bv) + _mm("...id,...jd->...ij", dW, z.Bk)
    dBv = _mm("...ji,...jv->...iv", z.T, dU)
    dBk = _mm("...ji,...jd->...id", z.T, dW)
    dA = -_mm("...ki,...kl,...jl->...ij", z.T, dT, z.T)  # -Tᵀ dT Tᵀ
    dA = jnp.where(gt.strict, dA, 0.0)

    bt, K, V = z.beta, z.K, z.V
    dQK = dP * gt.gam  # cotangent of Q Kᵀ through P
    dKK = dA * gt.gam * bt[..., :, None]  # cotangent of K Kᵀ through A
    dQ = _mm("...ij,...jd->...id", dQK, K) + dKq * gt.eg[..., None]
    dK = (_mm("...ji,...jd->...id", dQK, Q) + _mm("...ij,...jd->...id", dKK, K)
          + _mm("...ji,...jd->...id", dKK, K) + (bt * gt.eg)[..., None] * dBk + dKd * gt.dend[..., None])
    dV = bt[..., None] * dBv
    bk_k = jnp.sum(dBk * K, axis=-1)
    dbeta = jnp.sum(dA * z.KK * gt.gam, axis=-1) + jnp.sum(dBv * V, axis=-1) + gt.eg * bk_k
    # gate: d log Γ_ij, d exp(G), d exp(G_C - G), d exp(G_C) -> dG -> dg (reverse segmented cumsum)
    dlog = gt.gam * (dP * QK + dA * bt[..., :, None] * z.KK)
    deg = bt * bk_k + jnp.sum(dKq * Q, axis=-1)
    dden = jnp.sum(dKd * K, axis=-1) * gt.dend
    dG = jnp.sum(dlog, axis=-1) - jnp.sum(dlog, axis=-2) + deg * gt.eg - dden
    dG = dG.at[..., -1].add(jnp.sum(dden, axis=-1) + dgc * gt.gc)
    dgc_ = jnp.sum(jnp.where(gt.lseg, dG[..., :, None], 0.0), axis=-2)  # dg_j = Σ_{i>=j, same seg} dG_i
    dg = from_chunks(dgc_, t, h)

    dq = (from_chunks(dQ, t, h) * st.scale).astype(q.dtype)
    dk = from_chunks(dK, t, h).astype(k.dtype)
    dv = from_chunks(dV, t, h).astype(v.dtype)
    dresets = np.zeros(resets.shape, jax.dtypes.float0)
    return (dq, dk, dv, dg.astype(g.dtype), from_chunks(dbeta, t, h).astype(beta.dtype),
            by_head(ds0, h).astype(s0.dtype), dresets)


_delta_core.defvjp(_grouped_fwd, _grouped_bwd)
_delta_core_jit = jax.jit(_delta_core, static_argnums=(0,))  # one program per shape, not op-by-op when eager


def _defaults(q_or_k, v, beta, g, initial_state, resets):
    b, t, h, dk = q_or_k.shape
    dv = v.shape[-1]
    g = jnp.zeros((b, t, h), F32) if g is None else bounded_log_gate(g)  # clamped outside the custom VJP
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else jnp.asarray(initial_state, F32)
    resets = jnp.zeros((b, t), bool) if resets is None else jnp.asarray(resets, bool)
    return jnp.asarray(beta, F32), g, s0, resets


def chunk_delta(q, k, v, beta, g=None, initial_state=None, resets=None, *, scale: float, chunk_size: int = 64):
    """The chunked (gated) delta rule on validated arrays (API layout).

    q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, beta ``[B, T, H]``, g ``[B, T, H]`` log decay or None
    (DeltaNet), initial_state fp32 ``[B, H, Dk, Dv]`` or None, resets bool ``[B, T]`` (True: the state
    is zeroed before this token; a reset at t = 0 discards ``initial_state``) or None.
    Returns ``o`` fp32 ``[B, T, H, Dv]`` and ``final_state`` fp32 ``[B, H, Dk, Dv]``. Differentiable
    (custom VJP; residuals: inputs + one state per chunk).
    """
    beta, g, s0, resets = _defaults(q, v, beta, g, initial_state, resets)
    b, t, h = q.shape[:3]
    group, groups = _chunk_groups.plan(t, effective_chunk(t, chunk_size), b * h, GROUP_ROW_TOKENS)
    st = _Static(int(chunk_size), float(scale), group, groups)
    return _delta_core_jit(st, q, k, v, g, beta, s0, resets)


def xla_impl(call):
    """Registry entry for the ``xla`` implementation of both families (``call``: a RecurrentCall).

    bf16 / fp16 inputs are upcast to fp32 inside (every matmul runs in fp32); ``o`` is cast back.
    """
    o, s = chunk_delta(call.q, call.k, call.v, call.beta, call.g, call.initial_state, call.resets,
                       scale=call.scale, chunk_size=call.chunk_size)
    return call.finish(o, s)


# ----------------------------------------------------------------------------- operands of a state-pass kernel


def kernel_operands(q, k, v, beta, g=None, resets=None, *, scale: float, chunk: int) -> StatePassOperands:
    """The chunk-parallel part of the WY form for a state-pass kernel: the same :func:`_setup` as the
    ``xla`` form (gates, ``A``, the triangular inverse as matmuls, ``U``, ``W``) at chunk ``chunk``, in
    plain jnp and differentiated by JAX: the reference that ``pallas_kernels.gpu.delta_wy`` (the Mosaic GPU
    kernel of the same operands) is tested against. API-layout inputs as :func:`chunk_delta`; T is zero padded to
    a whole number of chunks (padding tokens have β = 0, g = 0 and leave the state unchanged)."""
    beta, g, _, resets = _defaults(q, v, beta, g, None, resets)
    t = q.shape[1]
    n = -(-t // chunk)
    z = _setup(chunk, n, k, v, g, beta, resets)
    Q = _chunk(q, chunk, n) * scale
    P = _mm("...id,...jd->...ij", Q, z.K) * z.gt.gam
    h = k.shape[2]
    flat = lambda x: by_head(x.reshape((x.shape[0], -1) + x.shape[3:]), h)  # noqa: E731 - [Z,N,C,·] -> [B,H,Tp,·]
    gc = by_head(z.gt.gc, h)
    a = jnp.broadcast_to(gc[..., None], gc.shape + (k.shape[-1],))
    return StatePassOperands(flat(Q * z.gt.eg[..., None]), flat(P), flat(z.Kd), flat(z.U), flat(z.W), a)


# ----------------------------------------------------------------------------- sequence-parallel summary


def chunk_summary(k, v, beta, g=None, *, resets=None, segment_ids=None, chunk_size: int = 64):
    """The affine summary ``(M, S_ext)`` of a whole input: ``final_state = M @ initial_state + S_ext``.

    k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, beta / g ``[B, T, H]`` (g None: DeltaNet), resets bool
    ``[B, T]`` (a reset at t = 0 gives ``M = 0``) or segment_ids int ``[B, T]`` (resets where the id
    changes). Per chunk ``M_c = exp(G_C) I − (K ⊙ exp(G_C − G))ᵀ W`` and ``S_c = (K ⊙ exp(G_C − G))ᵀ U``,
    composed in order with ``(M₂, S₂)∘(M₁, S₁) = (M₂M₁, M₂S₁ + S₂)``. Returns fp32 ``M [B, H, Dk, Dk]``
    and ``S_ext [B, H, Dk, Dv]`` (FAMILIES.md §4.5). Differentiable by plain autodiff.
    """
    if resets is None and segment_ids is not None:
        sid = jnp.asarray(segment_ids)
        resets = jnp.concatenate([jnp.zeros_like(sid[:, :1], bool), sid[:, 1:] != sid[:, :-1]], axis=1)
    beta, g, _, resets = _defaults(k, v, beta, g, None, resets)
    t, dk = k.shape[1], k.shape[-1]
    c, n = _sizes(int(chunk_size), t)
    z = _setup(c, n, k, v, g, beta, resets)
    m_c = z.gt.gc[..., None, None] * jnp.eye(dk, dtype=F32) - _mm("zncd,znce->znde", z.Kd, z.W)
    s_c = _mm("zncd,zncv->zndv", z.Kd, z.U)

    def body(carry, x):
        m, s = carry
        mc, sc = x
        return (_mm("zde,zef->zdf", mc, m), _mm("zde,zev->zdv", mc, s) + sc), None

    n_rows, h = m_c.shape[0], k.shape[2]
    init = (jnp.broadcast_to(jnp.eye(dk, dtype=F32), (n_rows, dk, dk)), jnp.zeros((n_rows, dk, v.shape[-1]), F32))
    (m, s), _ = jax.lax.scan(body, init, (jnp.moveaxis(m_c, 1, 0), jnp.moveaxis(s_c, 1, 0)))
    return by_head(m, h), by_head(s, h)


def summary(call, run=None):
    """LASP summary of a prepared (gated) delta-rule call: ``Summary("matrix", M, S_ext)`` (``run`` unused:
    the WY form gives M and S_ext directly)."""
    from seqmix.ops._recurrent import Summary

    m, s = chunk_summary(call.k, call.v, call.beta, call.g, resets=call.resets, chunk_size=call.chunk_size)
    return Summary("matrix", m, s)


# ----------------------------------------------------------------------------- token step (reference, decode)


def delta_step(state, q, k, v, beta, g=None):
    """One fp32 token of the (gated) delta rule in FAMILIES.md §2.7 order; ``[B, H, D]`` slices.

    ``S ← exp(g) S;  u = β (v − Sᵀk);  S ← S + k uᵀ;  o = Sᵀ q`` (q already scaled).
    Returns ``(state, o)``.
    """
    if g is not None:
        state = jnp.exp(g)[..., None, None] * state
    u = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", state, k, precision=HIGHEST))
    state = state + jnp.einsum("bhk,bhv->bhkv", k, u, precision=HIGHEST)
    return state, jnp.einsum("bhkv,bhk->bhv", state, q, precision=HIGHEST)


def decode_step(q_t, k_t, v_t, state, *, beta_t, g_t=None, scale=None, gated: bool):
    """Validated single-token step shared by ``delta_rule_step`` / ``gated_delta_rule_step``.

    q_t, k_t ``[B, H, Dk]``, v_t ``[B, H, Dv]``, state fp32 ``[B, H, Dk, Dv]`` or None (zeros),
    beta_t (and g_t) ``[B, H]``. Returns ``(o_t [B, H, Dv]`` in q's dtype, ``state`` fp32).
    """
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.require_rank(name, x, 3, "[batch, heads, head_dim]")
        _checks.require_float(name, x)
    b, h, dk = q_t.shape
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t must have q_t's shape {list(q_t.shape)}; got {list(k_t.shape)}")
    if v_t.shape[:2] != (b, h):
        raise ValueError(f"v_t must match q_t in [batch, heads] = {[b, h]}; got {list(v_t.shape)}")
    dv = v_t.shape[-1]
    _checks.require_float("beta", beta_t)
    _checks.require_shape("beta", beta_t, (b, h), "[batch, heads], this token's write strength")
    if gated:
        if g_t is None:
            raise ValueError("g (this token's log decay, [batch, heads]) is required")
        _checks.require_float("g", g_t)
        _checks.require_shape("g", g_t, (b, h), "[batch, heads], this token's log decay")
        g_t = jnp.asarray(g_t, F32)
    if state is None:
        state = jnp.zeros((b, h, dk, dv), F32)
    else:
        _checks.require_shape("state", state, (b, h, dk, dv), "[batch, heads, d_k, d_v]")
    scale = 1.0 / math.sqrt(dk) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    f = lambda x: jnp.asarray(x, F32)  # noqa: E731
    state, o = delta_step(f(state), f(q_t) * scale, f(k_t), f(v_t), f(beta_t), g_t)
    return o.astype(q_t.dtype), state
