"""Chunked (gated) delta rule for TPU (Pallas / Mosaic): forward and backward kernels.

DeltaNet / Gated DeltaNet (FAMILIES.md §2.7; DeltaNet is ``g ≡ 0``)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   α_t = exp(g_t),   o_t = S_tᵀ (scale·q_t)

This module is raw kernels plus their ``custom_vjp``; it imports nothing from ``seqmix``.

Kernel layout: ``q, k [B, H, Tp, Dk]``, ``v [B, H, Tp, Dv]`` (Tp = N·C, zero padded), ``tok [B, H, Tp, 8]``
fp32 per-token lanes (0: chunk-local inclusive cumsum ``G`` of g, 1: ``sid`` = resets seen so far inside the
chunk, 2: β), ``h0 [B, H, Dk, Dv]`` fp32. Grid ``(B, H, N)``, chunk axis sequential ("arbitrary"), the fp32
state ``S [Dk, Dv]`` in VMEM scratch. Per chunk, everything in fp32 (WY/UT form)::

    Γ_ij  = exp(G_i − G_j) for i ≥ j in the same segment (masked in log space), else 0
    A     = tril(diag(β) (K Kᵀ ⊙ Γ), −1);   T = (I + A)⁻¹
    U     = T (β ⊙ V);   W = T (β ⊙ exp(G) ⊙ K);   V_new = U − W S
    O     = scale · ((Q ⊙ exp(G)) S + (Q Kᵀ ⊙ Γ) V_new)
    S'    = exp(G_C) S + (K ⊙ exp(G_C − G))ᵀ V_new

with ``exp(G)`` zeroed after the chunk's first reset, ``exp(G_C − G)`` zeroed before its last reset and
``exp(G_C)`` zeroed when the chunk has a reset. The triangular inverse is matmul-only on the MXU: Neumann
doubling ``(I + A)⁻¹ = Π_{k < log2 C} (I + (−A)^{2^k})`` (A is strictly lower triangular, so nilpotent),
2·log2 C − 2 fp32 ``C × C`` matmuls at ``HIGHEST`` precision; C is a power of two.

Backward (§2.7 "Chunk backward"): the forward saves the chunk-start states ``[B, H, N, Dk, Dv]`` fp32; a
reverse-chunk kernel recomputes A, T, U, W per chunk, carries ``dS`` in VMEM scratch (initialized from the
final-state cotangent, written to ``d initial_state`` at the end) and emits dq, dk, dv, dβ and dg (the
chunk-local reverse cumsum of ``dG`` within segments, an exact masked fp32 sum).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gate_math import bounded_log_gate
from pallas_kernels.tpu.gated_linear import (_SQ, F32, LANE_BETA, LANE_G, LANE_SID, TOK_LANES, _col_to_row,
                                             _CompilerParams, _exp_where, _iota, _nn, _nt, _tn, _vmem)


@dataclasses.dataclass(frozen=True)
class DeltaConfig:
    """Static settings (hashable). chunk: C, a power of two >= 8 (>= 16 for bf16). gated: g is given."""

    chunk: int
    scale: float
    gated: bool
    out_dtype: str = "float32"
    interpret: Any = None
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        c = self.chunk
        if c < 8 or c & (c - 1):
            raise ValueError(f"chunk must be a power of two >= 8; got {c}")


def tri_inverse_neumann(a):
    """``(I + A)⁻¹`` for strictly lower triangular fp32 ``a (C, C)``, C a power of two (matmuls only)."""
    c = a.shape[0]
    eye = (_iota((c, c), 0) == _iota((c, c), 1)).astype(F32)
    x = -a
    p = eye + x
    for _ in range(c.bit_length() - 2):  # log2(C) − 1 more factors (I + X^(2^k))
        x = _nn(x, x)
        p = p + _nn(p, x)
    return p


@dataclasses.dataclass
class _Parts:
    lseg: Any  # (C, C) bool i >= j same segment
    strict: Any  # (C, C) bool i > j same segment
    gam: Any  # (C, C) exp(G_i − G_j) on lseg
    eg: Any  # (C, 1) exp(G) before the first reset
    dend: Any  # (C, 1) exp(G_C − G) after the last reset
    gc: Any  # (1, 1) exp(G_C) without a reset in the chunk
    beta: Any  # (C, 1)
    K: Any
    V: Any
    Q: Any  # scaled, fp32
    KK: Any
    QK: Any
    T: Any
    Bv: Any
    Bk: Any
    U: Any
    W: Any


def _parts(cfg: DeltaConfig, q, k, v, tok) -> _Parts:
    c = cfg.chunk
    sid = tok[:, LANE_SID:LANE_SID + 1]
    sid_row = _col_to_row(sid)
    sid_last = sid[c - 1:c, :]
    ii, jj = _iota((c, c), 0), _iota((c, c), 1)
    same = sid == sid_row
    lseg = (ii >= jj) & same
    strict = (ii > jj) & same
    beta = tok[:, LANE_BETA:LANE_BETA + 1]
    if cfg.gated:
        G = tok[:, LANE_G:LANE_G + 1]
        g_c = G[c - 1:c, :]
        gam = _exp_where(lseg, G - _col_to_row(G))
        eg = _exp_where(sid == 0.0, G)
        dend = _exp_where(sid == sid_last, g_c - G)
        gc = _exp_where(sid_last == 0.0, g_c)
    else:
        gam = lseg.astype(F32)
        eg = (sid == 0.0).astype(F32)
        dend = (sid == sid_last).astype(F32)
        gc = (sid_last == 0.0).astype(F32)
    K, V = k.astype(F32), v.astype(F32)
    Q = q.astype(F32) * cfg.scale
    KK = _nt(k, k)  # exact products of the input dtype, fp32 accumulation
    QK = _nt(q, k) * cfg.scale
    A = jnp.where(strict, beta * KK * gam, 0.0)
    T = tri_inverse_neumann(A)
    Bv = beta * V
    Bk = (beta * eg) * K
    U = _nn(T, Bv)
    W = _nn(T, Bk)
    return _Parts(lseg, strict, gam, eg, dend, gc, beta, K, V, Q, KK, QK, T, Bv, Bk, U, W)


def _fwd_kernel(q_ref, k_ref, v_ref, tok_ref, h0_ref, o_ref, sf_ref, *rest, cfg: DeltaConfig, n_chunks: int,
                save_states: bool):
    st_ref = rest[0] if save_states else None
    s_sc = rest[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_sc[...] = h0_ref[...]

    z = _parts(cfg, q_ref[...], k_ref[...], v_ref[...], tok_ref[...])
    s = s_sc[...]
    if st_ref is not None:
        st_ref[...] = s
    vn = z.U - _nn(z.W, s)
    o = _nn(z.Q * z.eg, s) + _nn(z.QK * z.gam, vn)
    o_ref[...] = o.astype(o_ref.dtype)
    s_sc[...] = z.gc * s + _tn(z.K * z.dend, vn)

    @pl.when(n == n_chunks - 1)
    def _finish():
        sf_ref[...] = s_sc[...]


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, tok_ref, st_ref, dsf_ref, dq_ref, dk_ref, dv_ref, dtok_ref,
                dh0_ref, ds_sc, *, cfg: DeltaConfig, n_chunks: int):
    n = pl.program_id(2)
    c = cfg.chunk

    @pl.when(n == 0)
    def _init():
        ds_sc[...] = dsf_ref[...]

    z = _parts(cfg, q_ref[...], k_ref[...], v_ref[...], tok_ref[...])
    s = st_ref[...]  # chunk-start state
    ds = ds_sc[...]  # cotangent of the chunk-end state
    dO = do_ref[...].astype(F32)
    vn = z.U - _nn(z.W, s)
    P = z.QK * z.gam
    Kq = z.Q * z.eg
    Kd = z.K * z.dend
    dvn = _tn(P, dO) + _nn(Kd, ds)
    ds_sc[...] = _tn(Kq, dO) + z.gc * ds - _tn(z.W, dvn)
    dP = _nt(dO, vn)
    dKq = _nt(dO, s)
    dKd = _nt(vn, ds)
    dgc = jnp.sum(jnp.sum(s * ds, axis=1, keepdims=True), axis=0, keepdims=True)  # (1, 1)
    dW = -_nt(dvn, s)
    dT = _nt(dvn, z.Bv) + _nt(dW, z.Bk)
    dBv = _tn(z.T, dvn)
    dBk = _tn(z.T, dW)
    dA = jnp.where(z.strict, -_tn(z.T, _nt(dT, z.T)), 0.0)  # −Tᵀ dT Tᵀ, strictly lower part
    dQK = dP * z.gam
    dKK = dA * z.gam * z.beta
    dQ = _nn(dQK, z.K) + dKq * z.eg
    dK = (_tn(dQK, z.Q) + _nn(dKK, z.K) + _tn(dKK, z.K) + (z.beta * z.eg) * dBk + dKd * z.dend)
    dV = z.beta * dBv
    bk_k = jnp.sum(dBk * z.K, axis=1, keepdims=True)
    dbeta = (jnp.sum(dA * z.KK * z.gam, axis=1, keepdims=True) + jnp.sum(dBv * z.V, axis=1, keepdims=True)
             + z.eg * bk_k)
    dq_ref[...] = (dQ * cfg.scale).astype(dq_ref.dtype)
    dk_ref[...] = dK.astype(dk_ref.dtype)
    dv_ref[...] = dV.astype(dv_ref.dtype)
    lane = _iota((c, TOK_LANES), 1)
    dtok = jnp.where(lane == LANE_BETA, dbeta, 0.0)
    if cfg.gated:
        # gate: through log Γ, exp(G), exp(G_C − G) and exp(G_C) -> dG -> dg_j = Σ_{i ≥ j, same seg} dG_i
        dlog = z.gam * (dP * z.QK + dA * z.beta * z.KK)
        deg = z.beta * bk_k + jnp.sum(dKq * z.Q, axis=1, keepdims=True)
        dden = jnp.sum(dKd * z.K, axis=1, keepdims=True) * z.dend  # (C, 1)
        row = _iota((c, 1), 0)
        dG_col = (jnp.sum(dlog, axis=1, keepdims=True) + deg * z.eg - dden
                  + jnp.where(row == c - 1, jnp.sum(dden, axis=0, keepdims=True) + dgc * z.gc, 0.0))
        dG_row = _col_to_row(dG_col) - jnp.sum(dlog, axis=0, keepdims=True)  # (1, C)
        ii, jj = _iota((c, c), 0), _iota((c, c), 1)
        sid = tok_ref[:, LANE_SID:LANE_SID + 1]
        upper_same = (jj >= ii) & (sid == _col_to_row(sid))  # [j, i]: i >= j, same segment
        dg = jnp.sum(jnp.where(upper_same, dG_row, 0.0), axis=1, keepdims=True)  # (C, 1)
        dtok = jnp.where(lane == LANE_G, dg, dtok)
    dtok_ref[...] = dtok

    @pl.when(n == n_chunks - 1)
    def _finish():
        dh0_ref[...] = ds_sc[...]


def _params(cfg):
    return _CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                           vmem_limit_bytes=cfg.vmem_limit_bytes)


def _fwd_call(cfg: DeltaConfig, q, k, v, tok, h0, save_states: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    cmap = lambda b_, h_, n_: (b_, h_, n_, 0)  # noqa: E731
    smap = lambda b_, h_, n_: (b_, h_, 0, 0)  # noqa: E731
    spec = lambda d: pl.BlockSpec((_SQ, _SQ, c, d), cmap)  # noqa: E731
    in_specs = [spec(dk), spec(dk), spec(dv), spec(TOK_LANES), pl.BlockSpec((_SQ, _SQ, dk, dv), smap)]
    out_specs = [spec(dv), pl.BlockSpec((_SQ, _SQ, dk, dv), smap)]
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), jnp.dtype(cfg.out_dtype)),
                 jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if save_states:
        out_specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, dk, dv), lambda b_, h_, n_: (b_, h_, n_, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
    flops = b * h * tp * (2 * c * (3 * dk + 3 * dv) + 2 * c * c * (c.bit_length() - 1) + 8 * dk * dv)
    nbytes = sum(x.size * x.dtype.itemsize for x in (q, k, v, tok, h0)) + b * h * tp * dv * 4
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_chunks=n, save_states=save_states),
        grid=(b, h, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[_vmem((dk, dv), F32)], compiler_params=_params(cfg), interpret=cfg.interpret,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(b * h * tp * c),
                                      bytes_accessed=int(nbytes)),
        name="seqmix_delta_fwd",
    )(q, k, v, tok, h0)
    return tuple(outs)


def _bwd_call(cfg: DeltaConfig, q, k, v, do, tok, states, dsf):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    cmap = lambda b_, h_, n_: (b_, h_, n - 1 - n_, 0)  # noqa: E731 - chunks in reverse
    smap = lambda b_, h_, n_: (b_, h_, 0, 0)  # noqa: E731
    spec = lambda d: pl.BlockSpec((_SQ, _SQ, c, d), cmap)  # noqa: E731
    in_specs = [spec(dk), spec(dk), spec(dv), spec(dv), spec(TOK_LANES),
                pl.BlockSpec((_SQ, _SQ, _SQ, dk, dv), lambda b_, h_, n_: (b_, h_, n - 1 - n_, 0, 0)),
                pl.BlockSpec((_SQ, _SQ, dk, dv), smap)]
    out_specs = [spec(dk), spec(dk), spec(dv), spec(TOK_LANES), pl.BlockSpec((_SQ, _SQ, dk, dv), smap)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(tok.shape, F32),
                 jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    flops = b * h * tp * (2 * c * (9 * dk + 9 * dv) + 2 * c * c * (c.bit_length() + 3) + 16 * dk * dv)
    nbytes = 2 * sum(x.size * x.dtype.itemsize for x in (q, k, v, do, tok, states))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg, n_chunks=n),
        grid=(b, h, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[_vmem((dk, dv), F32)], compiler_params=_params(cfg), interpret=cfg.interpret,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(b * h * tp * c),
                                      bytes_accessed=int(nbytes)),
        name="seqmix_delta_bwd",
    )(q, k, v, do, tok, states, dsf)


# ----------------------------------------------------------------------------- layout and custom_vjp


def token_lanes(cfg: DeltaConfig, g, beta, resets, b: int, h: int, tp: int):
    """``tok [B, H, Tp, 8]``: lane 0 chunk-local cumsum of g, lane 1 segment index inside the chunk, lane 2 β.

    g, beta: kernel layout ``[B, H, Tp]`` fp32 (g None for DeltaNet); resets bool ``[B, Tp]`` or None.
    """
    c, n = cfg.chunk, tp // cfg.chunk
    lanes = jnp.zeros((b, h, tp, TOK_LANES), F32)
    if g is not None:
        lanes = lanes.at[..., LANE_G].set(jnp.cumsum(g.astype(F32).reshape(b, h, n, c), axis=-1).reshape(b, h, tp))
    if resets is not None:
        sid = jnp.cumsum(resets.astype(jnp.int32).reshape(b, n, c), axis=-1).reshape(b, 1, tp).astype(F32)
        lanes = lanes.at[..., LANE_SID].set(jnp.broadcast_to(sid, (b, h, tp)))
    return lanes.at[..., LANE_BETA].set(beta.astype(F32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: DeltaConfig, q, k, v, g, beta, h0, resets):
    b, h, tp, _ = q.shape
    tok = token_lanes(cfg, g, beta, resets, b, h, tp)
    o, sf = _fwd_call(cfg, q, k, v, tok, h0, save_states=False)
    return o, sf


def _core_fwd(cfg, q, k, v, g, beta, h0, resets):
    b, h, tp, _ = q.shape
    tok = token_lanes(cfg, g, beta, resets, b, h, tp)
    o, sf, states = _fwd_call(cfg, q, k, v, tok, h0, save_states=True)
    return (o, sf), (q, k, v, g, beta, h0, resets, states)


def _core_bwd(cfg, res, cts):
    q, k, v, g, beta, h0, resets, states = res
    do, dsf = cts
    b, h, tp, _ = q.shape
    tok = token_lanes(cfg, g, beta, resets, b, h, tp)
    dq, dk, dv, dtok, dh0 = _bwd_call(cfg, q, k, v, do, tok, states, dsf.astype(F32))
    dg = None if g is None else dtok[..., LANE_G].astype(g.dtype)
    return dq, dk, dv, dg, dtok[..., LANE_BETA].astype(beta.dtype), dh0, None


_core.defvjp(_core_fwd, _core_bwd)

def delta_rule(cfg: DeltaConfig, q, k, v, beta, g=None, initial_state=None, resets=None):
    """The chunked (gated) delta rule in the API layout. Returns ``o [B, T, H, Dv]`` (``cfg.out_dtype``) and
    the final state fp32 ``[B, H, Dk, Dv]``.

    q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, beta ``[B, T, H]``, g ``[B, T, H]`` log decay (required iff
    ``cfg.gated``), initial_state fp32 ``[B, H, Dk, Dv]`` or None, resets bool ``[B, T]`` or None.
    Differentiable in q, k, v, beta, g and initial_state.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    tp = -(-t // cfg.chunk) * cfg.chunk

    def kl(x):
        if tp != t:
            x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x, 2, 1)

    gk = None
    if cfg.gated:
        gk = kl(bounded_log_gate(g))
    h0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else jnp.asarray(initial_state, F32)
    rk = None if resets is None else jnp.pad(jnp.asarray(resets, bool), [(0, 0), (0, tp - t)])
    o, sf = _core(cfg, kl(q), kl(k), kl(v.astype(q.dtype)), gk, kl(jnp.asarray(beta, F32)), h0, rk)
    return jnp.moveaxis(o, 1, 2)[:, :t], sf
