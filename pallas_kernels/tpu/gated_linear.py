"""Chunked gated linear attention for TPU (Pallas / Mosaic): forward and backward kernels.

One kernel family for the recurrence (FAMILIES.md §2.4–§2.6)

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

with ``gate="none"`` (linear attention), ``"scalar"`` (one log decay per head and token: simple_gla; a
constant per-head decay, retention, is the scalar path with ``gate_grad=False``) or ``"channel"`` (per key
channel: gla). This module is raw kernels plus their ``custom_vjp``; it imports nothing from ``seqmix``.

Kernel layout (built by :func:`gated_linear_attention` from the API's ``[B, T, H, D]``):
``q, k [B, H, Tp, Dk]``, ``v [B, H, Tp, Dv]`` (Tp = N·C, zero padded), ``tok [B, H, Tp, 8]`` fp32 per-token
lanes (0: chunk-local inclusive cumsum ``G`` of a scalar gate, 1: ``sid`` = resets seen so far inside the
chunk), ``gch [B, H, Tp, Dk]`` fp32 chunk-local cumsum of a per-channel gate, ``h0 [B, H, Dk, Dv]`` fp32.

Grid ``(B, H, N)``; the chunk axis is sequential ("arbitrary") and carries the fp32 state ``S [Dk, Dv]`` in
VMEM scratch (initialized from ``h0`` at chunk 0, written to ``final_state`` at the last chunk). Per chunk:

    O  = scale · ((Q ⊙ wq) S + P V),     S ← a ⊙ S + (K ⊙ wk)ᵀ V
    wq = exp(G) before the chunk's first reset, else 0;   wk = exp(G_C − G) after its last reset, else 0
    a  = exp(G_C) if the chunk has no reset, else 0

``P`` (fp32, zero above the diagonal and across segments): ``none`` ``(QKᵀ) ⊙ M``; ``scalar``
``(QKᵀ) ⊙ Γ``, ``Γ_ij = exp(G_i − G_j)`` masked in log space; ``channel``: secondary chunking in 16-row
sub-chunks, off-diagonal sub-blocks as one matmul per sub-chunk anchored at its first row (both factors
≤ 1), diagonal sub-blocks elementwise in fp32 one column at a time. Only differences ≤ 0 are
exponentiated.

Backward: the forward saves the chunk-start states ``[B, H, N, Dk, Dv]`` fp32; a reverse-chunk kernel
(same grid, chunk index ``N−1−n``) carries ``dS`` in VMEM scratch, initialized from the final-state
cotangent, and writes ``d initial_state`` at its last step. It emits ``dq, dk, dv`` and ``d log b`` per
token (``q ⊙ dq − k ⊙ dk`` without the i = j term, which cancels exactly); the gate gradient is the closed
form of §2.6, ``dg_t = Σ_{i ≥ t, same segment} d log b_i`` (+ ``Σ_v S_T ⊙ dS_T`` at the row end), a
segmented reverse cumsum in fp32 outside the kernel.

Precision: matmul operands in the input dtype (fp32 operands at ``HIGHEST``), ``preferred_element_type``
fp32 on every dot; gates, decay factors, ``P``, the state and every gradient reduction are fp32. Rows and
columns of per-token scalars are converted with exact select-and-sum identities, never transposes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gate_math import bounded_log_gate, segmented_reverse_cumsum

from pallas_kernels.tpu._compat import SQ as _SQ
from pallas_kernels.tpu._compat import CompilerParams as _CompilerParams
from pallas_kernels.tpu._compat import vmem as _vmem

F32 = jnp.float32
TOK_LANES = 8  # per-token fp32 lanes: G (scalar gate cumsum), sid (segment index inside the chunk), beta, ...
LANE_G, LANE_SID, LANE_BETA = 0, 1, 2
SUB_CHUNK = 16
GATES = ("none", "scalar", "channel")

@dataclasses.dataclass(frozen=True)
class GLAConfig:
    """Static settings of one call (hashable: the custom_vjp's non-differentiable argument).

    chunk: C, rows per chunk (multiple of 8; of 16 for bf16 and for ``gate="channel"``).
    gate: "none" | "scalar" | "channel". gate_grad: whether g receives a gradient (False: retention).
    out_dtype: dtype name of ``o``. interpret: ``pallas_call(interpret=...)`` (None compiles with Mosaic).
    """

    chunk: int
    gate: str
    scale: float
    gate_grad: bool = True
    out_dtype: str = "float32"
    interpret: Any = None
    vmem_limit_bytes: int | None = None
    sub: int = SUB_CHUNK

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}; got {self.gate!r}")
        if self.chunk % 8:
            raise ValueError(f"chunk must be a multiple of 8; got {self.chunk}")
        if self.gate == "channel" and self.chunk % self.sub:
            raise ValueError(f"chunk {self.chunk} must be a multiple of the sub-chunk {self.sub}")


# ----------------------------------------------------------------------------- in-kernel helpers


def _dot(a, b, dims):
    # Explicit precision on every dot: fp32 operands at HIGHEST; bf16 operands at DEFAULT, so a global
    # jax_default_matmul_precision="highest" does not ask Mosaic for an fp32 contraction of bf16 operands
    # (which it rejects: "Bad lhs type").
    hi = a.dtype == F32 and b.dtype == F32
    prec = jax.lax.Precision.HIGHEST if hi else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=F32)


def _nn(a, b):
    """a @ b."""
    return _dot(a, b, ((1,), (0,)))


def _nt(a, b):
    """a @ bᵀ."""
    return _dot(a, b, ((1,), (1,)))


def _tn(a, b):
    """aᵀ @ b (contract the rows)."""
    return _dot(a, b, ((0,), (0,)))


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _col_to_row(x):
    """(n, 1) -> (1, n), exactly (select the diagonal, sum over sublanes)."""
    n = x.shape[0]
    eye = _iota((n, n), 0) == _iota((n, n), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True)


def _row_to_col(x):
    """(1, n) -> (n, 1), exactly."""
    n = x.shape[1]
    eye = _iota((n, n), 0) == _iota((n, n), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


def _exp_where(ok, x):
    """exp(x) where ok else 0, masked in log space (no exp of a positive masked value)."""
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


@dataclasses.dataclass
class _Chunk:
    """Per-chunk gate factors (fp32). ``G``: (C, 1) scalar or (C, Dk) channel cumsum, None without gate."""

    ok: Any  # (C, C) bool: i >= j and same segment
    wq: Any  # (C, 1) / (C, Dk): exp(G) before the first reset
    wk: Any  # (C, 1) / (C, Dk): exp(G_C - G) after the last reset
    a: Any  # (1, 1) / (Dk, 1): exp(G_C) if the chunk has no reset
    gamma: Any  # (C, C) fp32 decay-and-mask (none / scalar), None for channel
    G: Any


def _chunk_factors(cfg: GLAConfig, tok, gch) -> _Chunk:
    c = cfg.chunk
    sid = tok[:, LANE_SID:LANE_SID + 1]  # (C, 1) fp32 small integers
    sid_row = _col_to_row(sid)
    sid_last = sid[c - 1:c, :]  # (1, 1)
    ok = (_iota((c, c), 0) >= _iota((c, c), 1)) & (sid == sid_row)
    first, last, carry = sid == 0.0, sid == sid_last, sid_last == 0.0
    if cfg.gate == "none":
        return _Chunk(ok, first.astype(F32), last.astype(F32), carry.astype(F32), ok.astype(F32), None)
    if cfg.gate == "scalar":
        G = tok[:, LANE_G:LANE_G + 1]
        g_c = G[c - 1:c, :]
        gamma = _exp_where(ok, G - _col_to_row(G))
        return _Chunk(ok, _exp_where(first, G), _exp_where(last, g_c - G), _exp_where(carry, g_c), gamma, G)
    G = gch  # (C, Dk)
    g_c = G[c - 1:c, :]  # (1, Dk)
    a = _row_to_col(_exp_where(carry, g_c))  # (Dk, 1)
    return _Chunk(ok, _exp_where(first, G), _exp_where(last, g_c - G), a, None, G)


def _channel_diag_cols(cfg: GLAConfig, G):
    """Helpers for the diagonal sub-blocks: 3-D views and the column index of row i's j-th partner."""
    c, sub = cfg.chunk, cfg.sub
    ns, dk = c // sub, G.shape[-1]
    g3 = G.reshape(ns, sub, dk)
    i3 = _iota((ns, sub, 1), 1)
    start = (_iota((c, 1), 0) // sub) * sub  # first row of row i's sub-chunk
    col = _iota((1, c), 1)
    return g3, i3, start, col


def _channel_scores(cfg: GLAConfig, f: _Chunk, q, k, cdt):
    """Per-channel intra-chunk scores P (fp32 (C, C), masked by ``f.ok``)."""
    c, sub = cfg.chunk, cfg.sub
    ns, dk = c // sub, q.shape[-1]
    G = f.G
    qf, kf = q.astype(F32), k.astype(F32)
    rows = [jnp.zeros((sub, c), F32)]
    jrow = _iota((c, 1), 0)
    for a in range(1, ns):  # off-diagonal: rows of sub-chunk a against columns j < a·sub
        r0 = a * sub
        g_r = G[r0:r0 + 1, :]
        qa = (qf[r0:r0 + sub, :] * jnp.exp(G[r0:r0 + sub, :] - g_r)).astype(cdt)
        ka = (kf * _exp_where(jrow < r0, g_r - G)).astype(cdt)
        rows.append(_nt(qa, ka))
    p = jnp.concatenate(rows, axis=0) if ns > 1 else rows[0]
    g3, i3, start, col = _channel_diag_cols(cfg, G)
    q3, k3 = qf.reshape(ns, sub, dk), kf.reshape(ns, sub, dk)
    for j in range(sub):  # diagonal sub-blocks, column j of every sub-chunk at once
        w = _exp_where(i3 >= j, g3 - g3[:, j:j + 1, :])
        pj = jnp.sum(q3 * k3[:, j:j + 1, :] * w, axis=-1, keepdims=True).reshape(c, 1)
        p = p + jnp.where(col == start + j, pj, 0.0)
    return jnp.where(f.ok, p, 0.0)


def _scores(cfg: GLAConfig, f: _Chunk, q, k, cdt):
    if cfg.gate == "channel":
        return _channel_scores(cfg, f, q, k, cdt)
    return _nt(q, k) * f.gamma


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(*refs, cfg: GLAConfig, n_chunks: int, save_states: bool):
    refs = list(refs)
    q_ref, k_ref, v_ref, tok_ref = refs[:4]
    gch_ref = refs[4] if cfg.gate == "channel" else None
    rest = refs[5:] if cfg.gate == "channel" else refs[4:]
    h0_ref, o_ref, sf_ref = rest[:3]
    st_ref = rest[3] if save_states else None
    s_sc = rest[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_sc[...] = h0_ref[...]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    cdt = q.dtype
    f = _chunk_factors(cfg, tok_ref[...], None if gch_ref is None else gch_ref[...])
    s = s_sc[...]
    if st_ref is not None:
        st_ref[...] = s
    qw = (q.astype(F32) * f.wq).astype(cdt)
    o = _nn(qw, s.astype(cdt)) + _nn(_scores(cfg, f, q, k, cdt).astype(cdt), v)
    o_ref[...] = (o * cfg.scale).astype(o_ref.dtype)
    kw = (k.astype(F32) * f.wk).astype(cdt)
    s_sc[...] = f.a * s + _tn(kw, v)

    @pl.when(n == n_chunks - 1)
    def _finish():
        sf_ref[...] = s_sc[...]


def _specs(cfg: GLAConfig, dk: int, dv: int, reverse_chunks: int | None):
    """BlockSpecs for the per-chunk inputs (q, k, v-like, tok, gch); ``reverse_chunks`` = N walks backwards."""
    c = cfg.chunk

    def chunk_map(b, h, n):
        return (b, h, n if reverse_chunks is None else reverse_chunks - 1 - n, 0)

    def spec(d):
        return pl.BlockSpec((_SQ, _SQ, c, d), chunk_map)

    return spec, chunk_map


def _params(cfg: GLAConfig):
    return _CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                           vmem_limit_bytes=cfg.vmem_limit_bytes)


def _fwd_call(cfg: GLAConfig, q, k, v, tok, gch, h0, save_states: bool):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    spec, chunk_map = _specs(cfg, dk, dv, None)
    state_map = lambda b_, h_, n_: (b_, h_, 0, 0)  # noqa: E731
    in_specs = [spec(dk), spec(dk), spec(dv), spec(TOK_LANES)]
    args = [q, k, v, tok]
    if cfg.gate == "channel":
        in_specs.append(spec(dk))
        args.append(gch)
    in_specs.append(pl.BlockSpec((_SQ, _SQ, dk, dv), state_map))
    args.append(h0)
    out_specs = [spec(dv), pl.BlockSpec((_SQ, _SQ, dk, dv), state_map)]
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), jnp.dtype(cfg.out_dtype)),
                 jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if save_states:
        out_specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, dk, dv), lambda b_, h_, n_: (b_, h_, n_, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), F32))
    flops = b * h * tp * (4 * c * (dk + dv) + 4 * dk * dv)
    nbytes = sum(x.size * x.dtype.itemsize for x in args) + b * h * tp * dv * jnp.dtype(cfg.out_dtype).itemsize
    kernel = functools.partial(_fwd_kernel, cfg=cfg, n_chunks=n, save_states=save_states)
    outs = pl.pallas_call(
        kernel,
        grid=(b, h, n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[_vmem((dk, dv), F32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(b * h * tp * (c + dk)),
                                      bytes_accessed=int(nbytes)),
        name=f"seqmix_gla_fwd_{cfg.gate}",
    )(*args)
    return tuple(outs)


# ----------------------------------------------------------------------------- backward kernel


def _channel_intra_grads(cfg: GLAConfig, f: _Chunk, q, k, dp, cdt):
    """dq, dk (fp32 (C, Dk)) of the intra-chunk per-channel scores, given dP (fp32, masked, no diagonal)."""
    c, sub = cfg.chunk, cfg.sub
    ns, dk = c // sub, q.shape[-1]
    G = f.G
    qf, kf = q.astype(F32), k.astype(F32)
    jrow = _iota((c, 1), 0)
    dq_rows = [jnp.zeros((sub, dk), F32)]
    dk_off = jnp.zeros((c, dk), F32)
    for a in range(1, ns):
        r0 = a * sub
        g_r = G[r0:r0 + 1, :]
        qf_a = jnp.exp(G[r0:r0 + sub, :] - g_r)
        kf_a = _exp_where(jrow < r0, g_r - G)
        qa = (qf[r0:r0 + sub, :] * qf_a).astype(cdt)
        ka = (kf * kf_a).astype(cdt)
        dpa = dp[r0:r0 + sub, :].astype(cdt)
        dq_rows.append(qf_a * _nn(dpa, ka))
        dk_off = dk_off + kf_a * _tn(dpa, qa)
    dq = jnp.concatenate(dq_rows, axis=0) if ns > 1 else dq_rows[0]
    g3, i3, start, col = _channel_diag_cols(cfg, G)
    q3, k3 = qf.reshape(ns, sub, dk), kf.reshape(ns, sub, dk)
    dq3 = jnp.zeros((ns, sub, dk), F32)
    dk3 = jnp.zeros((ns, sub, dk), F32)
    for j in range(sub):
        w = _exp_where(i3 >= j, g3 - g3[:, j:j + 1, :])
        dpj = jnp.sum(jnp.where(col == start + j, dp, 0.0), axis=1, keepdims=True).reshape(ns, sub, 1)
        dq3 = dq3 + dpj * k3[:, j:j + 1, :] * w
        dkj = jnp.sum(dpj * q3 * w, axis=1, keepdims=True)  # (ns, 1, Dk)
        dk3 = dk3 + jnp.where(i3 == j, dkj, 0.0)
    return dq + dq3.reshape(c, dk), dk_off + dk3.reshape(c, dk)


def _bwd_kernel(*refs, cfg: GLAConfig, n_chunks: int):
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, tok_ref = refs[:5]
    i = 5
    gch_ref = None
    if cfg.gate == "channel":
        gch_ref, i = refs[5], 6
    st_ref, dsf_ref = refs[i], refs[i + 1]
    dq_ref, dk_ref, dv_ref = refs[i + 2:i + 5]
    i += 5
    dlb_ref = None
    if cfg.gate != "none" and cfg.gate_grad:
        dlb_ref, i = refs[i], i + 1
    dh0_ref, ds_sc = refs[i], refs[i + 1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        ds_sc[...] = dsf_ref[...]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    cdt = q.dtype
    qf, kf = q.astype(F32), k.astype(F32)
    do = (do_ref[...].astype(F32) * cfg.scale).astype(cdt)  # the scale is folded into dO
    f = _chunk_factors(cfg, tok_ref[...], None if gch_ref is None else gch_ref[...])
    s = st_ref[...].astype(cdt)  # chunk-start state
    ds = ds_sc[...]  # cotangent of the chunk-end state
    dsc = ds.astype(cdt)
    kw = (kf * f.wk).astype(cdt)
    qw = (qf * f.wq).astype(cdt)
    dq = _nt(do, s) * f.wq
    dk = _nt(v, dsc) * f.wk
    dv = _nn(kw, dsc) + _tn(_scores(cfg, f, q, k, cdt).astype(cdt), do)
    dp = _nt(do, v)  # (C, C) fp32
    c = cfg.chunk
    eye = _iota((c, c), 0) == _iota((c, c), 1)
    if cfg.gate == "channel":
        dpm = jnp.where(f.ok & ~eye, dp, 0.0)
        dq_i, dk_i = _channel_intra_grads(cfg, f, q, k, dpm, cdt)
    else:
        da = jnp.where(eye, 0.0, dp * f.gamma).astype(cdt)
        dq_i, dk_i = _nn(da, k), _tn(da, q)
    dq, dk = dq + dq_i, dk + dk_i
    if dlb_ref is not None:  # d log b without the i = j term (it cancels exactly in q ⊙ dq − k ⊙ dk)
        dlb = qf * dq - kf * dk
        if cfg.gate == "scalar":
            dlb = jnp.sum(dlb, axis=1, keepdims=True)
        dlb_ref[...] = dlb
    dp_diag = jnp.sum(jnp.where(eye, dp, 0.0), axis=1, keepdims=True)  # (C, 1)
    dq_ref[...] = (dq + dp_diag * kf).astype(dq_ref.dtype)
    dk_ref[...] = (dk + dp_diag * qf).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_sc[...] = f.a * ds + _tn(qw, do)

    @pl.when(n == n_chunks - 1)
    def _finish():
        dh0_ref[...] = ds_sc[...]


def _bwd_call(cfg: GLAConfig, q, k, v, do, tok, gch, states, dsf):
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    c = cfg.chunk
    n = tp // c
    spec, _ = _specs(cfg, dk, dv, n)
    state_map = lambda b_, h_, n_: (b_, h_, 0, 0)  # noqa: E731
    in_specs = [spec(dk), spec(dk), spec(dv), spec(dv), spec(TOK_LANES)]
    args = [q, k, v, do, tok]
    if cfg.gate == "channel":
        in_specs.append(spec(dk))
        args.append(gch)
    in_specs += [pl.BlockSpec((_SQ, _SQ, _SQ, dk, dv), lambda b_, h_, n_: (b_, h_, n - 1 - n_, 0, 0)),
                 pl.BlockSpec((_SQ, _SQ, dk, dv), state_map)]
    args += [states, dsf]
    out_specs = [spec(dk), spec(dk), spec(dv)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)]
    with_dlb = cfg.gate != "none" and cfg.gate_grad
    if with_dlb:
        width = dk if cfg.gate == "channel" else 1
        out_specs.append(spec(width))
        out_shape.append(jax.ShapeDtypeStruct((b, h, tp, width), F32))
    out_specs.append(pl.BlockSpec((_SQ, _SQ, dk, dv), state_map))
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), F32))
    flops = b * h * tp * (8 * c * (dk + dv) + 8 * dk * dv)
    nbytes = sum(x.size * x.dtype.itemsize for x in args) * 2
    kernel = functools.partial(_bwd_kernel, cfg=cfg, n_chunks=n)
    outs = pl.pallas_call(
        kernel,
        grid=(b, h, n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[_vmem((dk, dv), F32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(b * h * tp * (c + dk)),
                                      bytes_accessed=int(nbytes)),
        name=f"seqmix_gla_bwd_{cfg.gate}",
    )(*args)
    dq, dk_, dv_ = outs[:3]
    dlb = outs[3] if with_dlb else None
    return dq, dk_, dv_, dlb, outs[-1]


# ----------------------------------------------------------------------------- layout and custom_vjp


def token_lanes(cfg: GLAConfig, g, resets, b: int, h: int, tp: int):
    """``tok [B, H, Tp, 8]`` fp32 (lane 0: chunk-local cumsum of a scalar gate; lane 1: segment index inside
    the chunk) and ``gch [B, H, Tp, Dk]`` (chunk-local cumsum of a per-channel gate, else None).

    g: kernel layout ``[B, H, Tp]`` / ``[B, H, Tp, Dk]`` fp32 or None; resets bool ``[B, Tp]`` or None.
    """
    c, n = cfg.chunk, tp // cfg.chunk
    lanes = jnp.zeros((b, h, tp, TOK_LANES), F32)
    gch = None
    if g is not None and cfg.gate == "scalar":
        big_g = jnp.cumsum(g.astype(F32).reshape(b, h, n, c), axis=-1).reshape(b, h, tp)
        lanes = lanes.at[..., LANE_G].set(big_g)
    elif g is not None:
        dk = g.shape[-1]
        gch = jnp.cumsum(g.astype(F32).reshape(b, h, n, c, dk), axis=3).reshape(b, h, tp, dk)
    if resets is not None:
        sid = jnp.cumsum(resets.astype(jnp.int32).reshape(b, n, c), axis=-1).reshape(b, 1, tp).astype(F32)
        lanes = lanes.at[..., LANE_SID].set(jnp.broadcast_to(sid, (b, h, tp)))
    return lanes, gch


def _zeros_h0(q, v):
    return jnp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: GLAConfig, q, k, v, g, h0, resets):
    o, sf, _ = _core_fwd_impl(cfg, q, k, v, g, h0, resets, save_states=False)
    return o, sf


def _core_fwd_impl(cfg, q, k, v, g, h0, resets, save_states):
    b, h, tp, _ = q.shape
    tok, gch = token_lanes(cfg, g, resets, b, h, tp)
    h0 = _zeros_h0(q, v) if h0 is None else h0.astype(F32)
    outs = _fwd_call(cfg, q, k, v, tok, gch, h0, save_states)
    return outs[0], outs[1], (outs[2] if save_states else None)


def _core_fwd(cfg, q, k, v, g, h0, resets):
    o, sf, states = _core_fwd_impl(cfg, q, k, v, g, h0, resets, save_states=True)
    return (o, sf), (q, k, v, g, h0, resets, states, sf)


def _core_bwd(cfg, res, cts):
    q, k, v, g, h0, resets, states, sf = res
    do, dsf = cts
    b, h, tp, _ = q.shape
    tok, gch = token_lanes(cfg, g, resets, b, h, tp)
    dsf = jnp.zeros_like(sf) if dsf is None else dsf.astype(F32)
    dq, dk, dv, dlb, dh0 = _bwd_call(cfg, q, k, v, do.astype(q.dtype) if do.dtype != F32 else do,
                                     tok, gch, states, dsf)
    dg = None
    if g is not None:
        if dlb is None:
            dg = jnp.zeros_like(g)
        else:
            final = jnp.sum(sf * dsf, axis=-1)  # [B, H, Dk]: the final-state term at the row end
            if cfg.gate == "scalar":
                dlb, final = dlb[..., 0], jnp.sum(final, axis=-1)
            dlb = dlb.at[:, :, -1].add(final)
            dg = segmented_reverse_cumsum(dlb, resets).astype(g.dtype)
    dh0 = None if h0 is None else dh0.astype(h0.dtype)
    return dq, dk, dv, dg, dh0, None


_core.defvjp(_core_fwd, _core_bwd)


def _to_kernel(x, tp):
    """``[B, T, H, ...]`` -> ``[B, H, Tp, ...]`` zero padded."""
    t = x.shape[1]
    if tp != t:
        x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x, 2, 1)


def gated_linear_attention(cfg: GLAConfig, q, k, v, g=None, initial_state=None, resets=None):
    """The chunked recurrence in the API layout. Returns ``o [B, T, H, Dv]`` (``cfg.out_dtype``) and the
    final state fp32 ``[B, H, Dk, Dv]``.

    q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (one dtype: the matmul operand dtype); g fp32 log decay
    ``[B, T, H]`` (scalar) / ``[B, T, H, Dk]`` (channel) / None, matching ``cfg.gate``; initial_state fp32
    ``[B, H, Dk, Dv]`` or None; resets bool ``[B, T]`` (state zeroed before the token) or None.
    Differentiable in q, k, v, g (closed form; zeros if ``cfg.gate_grad`` is False) and initial_state.
    """
    t = q.shape[1]
    tp = -(-t // cfg.chunk) * cfg.chunk
    qk = _to_kernel(q, tp), _to_kernel(k, tp)
    vk = _to_kernel(v.astype(q.dtype), tp)
    gk = None if g is None else _to_kernel(bounded_log_gate(g), tp)
    rk = None
    if resets is not None:
        rk = jnp.pad(jnp.asarray(resets, bool), [(0, 0), (0, tp - t)])
    o, sf = _core(cfg, qk[0], qk[1], vk, gk, initial_state, rk)
    return jnp.moveaxis(o, 1, 2)[:, :t], sf
