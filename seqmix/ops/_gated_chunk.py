"""The chunkwise-parallel algorithm shared by ``linear_attention``, ``retention``, ``simple_gla`` and ``gla``.

All four families are one recurrence (FAMILIES.md §2.4–§2.6):

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

with ``g`` absent (linear attention: ``α = 1``), ``[B, T, H]`` (a scalar log decay per head and token:
retention, simple_gla) or ``[B, T, H, Dk]`` (per channel: gla). The state resets to 0 before every token
whose ``resets`` flag is set.

Chunk form (chunk length C, ``G`` = chunk-local inclusive cumsum of ``g`` in fp32, ``G_C`` its last row):

    S_[n] = Diag(exp(G_C)) S_[n-1] + (K ⊙ exp(G_C − G))ᵀ V       (sequential pass over chunks, fp32 carry)
    O     = scale · ((Q ⊙ exp(G)) S_[n-1] + P V),   P_ij = Σ_c Q_ic K_jc exp(G_ic − G_jc)  (i ≥ j)

Only differences that are ≤ 0 are exponentiated (``G_i − G_j`` with i ≥ j, ``G_C − G_j``, ``G_i``), except in
the anchored per-channel path below (bounded by ``e^{20}``), and every mask (causal, segment) is applied in log
space (``-inf``) before ``exp``. Four paths build ``P``:

* ``"none"``   (no gate): ``P = (Q Kᵀ) ⊙ M``;
* ``"scalar"``: ``P = (Q Kᵀ) ⊙ Γ``, ``Γ_ij = exp(G_i − G_j)`` masked to ``i ≥ j`` (same segment) in log space;
* ``"channel"``, anchored (a chunk whose per-channel span ``max G − min G`` is ≤ ``ANCHOR_SPAN`` = 40 nats, which
  typical gates meet by far): ``P = (Q ⊙ exp(G − m)) (K ⊙ exp(m − G))ᵀ`` masked, ``m`` the middle of the
  chunk's range per channel, so both factors lie within ``e^{±20}``: one C×C matmul as in the scalar path;
  computed for every chunk, then the wider ones are recomputed by
* ``"channel"``, secondary chunking (exact for any span; a loop over batches of the wide chunks only, which
  runs zero times on typical gates: :func:`_redo_wide_chunks`): sub-chunks of
  ``sub`` rows (16 by default); off-diagonal sub-blocks
  ``(a, b), a > b`` are one matmul anchored at ``r``, the first row of sub-chunk ``a``:
  ``(Q_[a] ⊙ exp(G_[a] − G_r)) (K_[b] ⊙ exp(G_r − G_[b]))ᵀ`` (both factors ≤ 1); diagonal sub-blocks are
  computed elementwise in fp32, column by column (a ``lax.scan`` over the ``sub`` columns, so no
  ``[sub, sub, Dk]`` tensor per sub-chunk is ever materialized). ``sub = gcd(C, 16)``.

Segments (``resets``): the gate cumsum runs through resets, which is harmless because every exponent that
survives the masks spans tokens of a single segment. Inside a chunk with segment index ``c`` (number of resets
seen so far in the chunk): token i attends to j ≤ i only when ``c_i = c_j``; the chunk-start state reaches
only tokens with ``c = 0``; the chunk-end state collects only tokens with ``c = c_last`` and keeps the
incoming state only when the chunk has no reset. Lengths are zero-padded to a multiple of C (``k = v = 0``,
``g = 0``: padded tokens leave the final state unchanged).

Groups: on CPU, inputs longer than about ``GROUP_ROW_TOKENS`` tokens × rows run everything here group by
group, with the state carried between groups (:mod:`seqmix.ops._chunk_groups`).

Backward: a ``jax.custom_vjp``. The residuals are the inputs and the final state (plus, for scalar gates,
their ``[Z, N, C]`` chunk-local cumsum), no per-token or per-chunk state: the backward recomputes the
chunk-start states with the same cheap state pass, runs the reverse state pass
``dS_[n-1] = Diag(exp(G_C)) dS_[n] + (Q ⊙ exp(G))ᵀ dO`` and the chunk backward of §2.6 in parallel over
chunks. The gate gradient uses the closed form

    d log b_t = q_t ⊙ dq_t − k_t ⊙ dk_t   (+ Σ_v S_T ⊙ dS_T at the row's last token)
    d g_t     = Σ_{i ≥ t, same segment} d log b_i         (fp32 segmented reverse cumsum)

summed over d_k for scalar gates. ``d initial_state`` is the reverse pass's final carry. The i = j term of
``dq, dk`` (which cancels exactly in ``q ⊙ dq − k ⊙ dk``) is left out of that difference, so with no
final-state cotangent dg keeps full relative accuracy even for gates like g = −50. Known limit: with a
final-state cotangent, the term ``Σ_v S_T ⊙ dS_T`` is cancelled token by token through the reverse cumsum,
which leaves absolute fp32 noise of order ``ε·|S_T|·|dS_T|`` on the row's last segment where the true
gradient is ~0 (fast-decaying gates); removing it would need a second reverse state pass.

Gates are clamped at ``pallas_kernels.gate_math.LOG_GATE_FLOOR`` (-30) first, so ``g = -inf`` (a hard
reset) and huge negative gates stay exact to fp32 precision instead of turning into NaN or swamping the
cumsum.

Layout: batch and heads share one leading axis ``Z = B·H`` inside (``[Z, N, C, D]``): XLA:CPU (jax 0.10.2)
runs a reduction over fused elementwise work up to ~30× slower when an operand has a size-1 axis, and B = 1 is
the common case (the secondary-chunking diagonal went from 677 ms to 75 ms at T = 8192, H = 4; jax 0.12's
XLA no longer has the slowdown, and the shared axis costs nothing there).

Precision: matmul operands in the input dtype, ``preferred_element_type=float32``; gate cumsums, decay
factors, ``P`` (before the PV matmul), the state carry and every gradient reduction are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gate_math import bounded_log_gate, reverse_affine_scan
from seqmix.ops import _checks, _chunk_groups
from seqmix.ops._recurrent import by_head, from_chunks, resets_to_chunks, rows, to_chunks

Array = Any
F32 = jnp.float32
SUB_CHUNK = 16  # secondary-chunk rows for per-channel gates (FAMILIES.md §2.6)
# Per-channel gates: a chunk whose log-decay span max_i G_i − min_i G_i (per channel) is at most this many
# nats takes one anchored C×C matmul, with factors exp(±(G − m)) within e^{±20} of 1 (far from fp32/bf16
# overflow: products with |q|, |k| up to 1e10 stay finite). Typical gates span a few nats per 64-token chunk
# (GLA's logsigmoid/16 gate: ~3); a hard reset (g = −30 after clamping) still fits. Wider spans take
# secondary chunking, which forms no positive exponent at all.
ANCHOR_SPAN = 40.0
# Wide chunks (span > ANCHOR_SPAN) recomputed per loop step by secondary chunking (_redo_wide_chunks).
WIDE_BATCH = 256
# Tokens × rows (batch · heads) per group of chunks, by gate kind: on CPU longer inputs run the chunked form
# one group at a time in a loop that carries the state (seqmix/ops/_chunk_groups.py), so that a group's
# intermediates stay in cache. Chosen by interleaved A/B on CPU (2 cores, 32 MiB L3; fwd+bwd, B·H = 4,
# D = 64, ms; no groups / 2048 / 4096): simple_gla T = 8k 90 / 69 / 67, 32k 499 / 287 / 281; gla (per-channel
# factors: about twice the intermediates) 8k 120 / 91 / 90, 32k 650 / 403 / 406, and in longer runs of
# 2048 / 4096 alone 1k 10 / 9 (one group), 2k 22 / 28-32, 4k 40-44 / 49 (docs/RESULTS.md).
GROUP_ROW_TOKENS = {"none": 4096, "scalar": 4096, "channel": 2048}


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Static settings of one chunked call (hashable: the custom_vjp's non-differentiable argument)."""

    chunk: int  # C, rows per chunk
    sub: int  # secondary-chunk rows (channel gates only; divides C)
    gate: str  # "none" | "scalar" | "channel"
    scale: float
    length: int  # T, unpadded
    group: int  # tokens per group of chunks (a multiple of C); the padded length when there is one group
    groups: int  # number of groups the loop runs


def gate_kind(g) -> str:
    """``"none"``, ``"scalar"`` (g ``[B, T, H]``) or ``"channel"`` (g ``[B, T, H, Dk]``)."""
    if g is None:
        return "none"
    return "scalar" if jnp.ndim(g) == 3 else "channel"


def effective_chunk(length: int, chunk_size: int) -> tuple[int, int]:
    """(C, sub): the requested chunk, shrunk to ``max(16, next_pow2(T))`` for short inputs; ``sub | C``."""
    c = min(chunk_size, max(16, 1 << max(0, (length - 1).bit_length())))
    return c, math.gcd(c, SUB_CHUNK)


def make_config(q, g, chunk_size: int, scale: float) -> ChunkConfig:
    b, t, h = q.shape[:3]
    c, sub = effective_chunk(t, chunk_size)
    gate = gate_kind(g)
    group, groups = _chunk_groups.plan(t, c, b * h, GROUP_ROW_TOKENS[gate])
    return ChunkConfig(chunk=c, sub=sub, gate=gate, scale=float(scale), length=t, group=group, groups=groups)


def describe(call) -> str:
    """The registry's ``describe`` for the chunked implementations: chunk (and sub-chunk) length, groups."""
    cfg = make_config(call.q, call.g, call.chunk_size, call.scale)
    extra = f", sub_chunk={cfg.sub}" if cfg.gate == "channel" else ""
    groups = f", {cfg.groups} groups of {cfg.group} tokens" if cfg.groups > 1 else ""
    return f"chunk_size={cfg.chunk}{extra}, gate={cfg.gate}{groups}"


# ----------------------------------------------------------------------------- layout helpers


def _dot(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def _exp_masked(x, ok):
    """``exp(x)`` where ``ok`` else 0, masked in log space. ``x = None`` means ``exp(0)``; ``ok = None`` all."""
    if x is None:
        return None if ok is None else ok.astype(F32)
    if ok is None:
        return jnp.exp(x)
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


def _weighted(x, w, dtype):
    """``x ⊙ w`` (w per row ``[..., C]`` or per channel ``[..., C, D]``) in fp32, cast to ``dtype``."""
    if w is None:
        return x.astype(dtype)
    w = w if w.ndim == x.ndim else w[..., None]
    return (x.astype(F32) * w).astype(dtype)


class _Chunked(NamedTuple):
    q: Array  # [Z, N, C, Dk] compute dtype (Z = batch × heads)
    k: Array  # [Z, N, C, Dk]
    v: Array  # [Z, N, C, Dv]
    G: Array | None  # [Z, N, C] or [Z, N, C, Dk] fp32 chunk-local inclusive cumsum of g
    seg: Array | None  # [Z, N, C] int32: resets seen so far inside the chunk


class _Factors(NamedTuple):
    wq: Array | None  # exp(G_i), 0 after the chunk's first reset           (like G)
    wk: Array | None  # exp(G_C − G_j), 0 before the chunk's last reset      (like G)
    a: Array | None  # exp(G_C), 0 if the chunk has a reset                   [Z, N(, Dk)]
    ok: Array  # bool [C, C] or [Z, N, C, C]: i ≥ j and same segment
    gamma: Array | None  # fp32 [.., C, C] decay-and-mask matrix (paths "none" and "scalar")


def _masked_sum(x, mask, transpose: bool):
    """``y_i = Σ_j mask_ij x_j`` (``mask_ji`` if ``transpose``) inside every chunk, as one fp32 matmul: x
    ``[Z, N, C(, D)]``, mask bool ``[C, C]`` or ``[Z, N, C, C]``. The chunks' (segmented) cumsums: XLA:CPU runs
    a cumsum as a reduce-window with transposing copies around it, slower than this matmul (gla fwd+bwd
    T = 8k: −9%)."""
    xs = "znj" + ("d" if x.ndim == 4 else "")
    ij = ("zn" if mask.ndim == 4 else "") + ("ji" if transpose else "ij")
    return jnp.einsum(f"{xs},{ij}->{xs.replace('j', 'i')}", x, mask.astype(F32),
                      precision=jax.lax.Precision.HIGHEST)


def _split(cfg: ChunkConfig, q, k, v, g, resets, big_g=None) -> _Chunked:
    """The chunk layout; ``big_g``, when given, is the chunk-local gate cumsum the forward already formed."""
    c = cfg.chunk
    n = -(-cfg.length // c)
    cdt = q.dtype
    qc, kc, vc = to_chunks(q, c, n), to_chunks(k, c, n), to_chunks(v, c, n).astype(cdt)
    if g is not None and big_g is None:
        causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
        big_g = _masked_sum(to_chunks(g.astype(F32), c, n), causal, transpose=False)
    seg = None
    if resets is not None:
        r = resets_to_chunks(resets, q.shape[2], c, n)  # [Z, N, C]
        seg = jnp.cumsum(r, axis=-1)
    return _Chunked(qc, kc, vc, big_g, seg)


def _factors(cfg: ChunkConfig, x: _Chunked) -> _Factors:
    c = cfg.chunk
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    first = last = carry = None
    ok = causal
    if x.seg is not None:
        s_last = x.seg[..., -1:]
        first, last, carry = x.seg == 0, x.seg == s_last, s_last[..., 0] == 0
        ok = causal & (x.seg[..., :, None] == x.seg[..., None, :])
    ch = cfg.gate == "channel"
    chan = (lambda m: None if m is None else m[..., None]) if ch else (lambda m: m)
    G = x.G
    if G is None:
        wq, wk, a = _exp_masked(None, first), _exp_masked(None, last), _exp_masked(None, carry)
    else:
        g_c = G[..., -1, :] if ch else G[..., -1]
        wq = _exp_masked(G, chan(first))
        wk = _exp_masked((g_c[..., None, :] if ch else g_c[..., None]) - G, chan(last))
        a = _exp_masked(g_c, chan(carry))
    gamma = None
    if cfg.gate == "none":
        gamma = ok.astype(F32)
    elif cfg.gate == "scalar":
        gamma = jnp.exp(jnp.where(ok, G[..., :, None] - G[..., None, :], -jnp.inf))
    return _Factors(wq, wk, a, ok, gamma)


def _state_pass(cfg: ChunkConfig, s_ext, a, h0, reverse: bool = False):
    """``S_n = a_n ⊙ S_{n-1} + s_ext_n`` over chunks (fp32). Returns (per-chunk carries seen, last carry).

    Forward: outputs the chunk-start states ``S_{n-1}``. Reverse (``dS_{n-1} = a_n ⊙ dS_n + s_ext_n``):
    outputs the chunk-end gradients ``dS_n`` and ends on ``dS_0``.
    """
    s0 = jnp.zeros(s_ext.shape[:1] + s_ext.shape[2:], F32) if h0 is None else h0.astype(F32)
    xs = jnp.moveaxis(s_ext, 1, 0)
    a_s = None if a is None else jnp.moveaxis(a, 1, 0)
    per_channel = cfg.gate == "channel"

    def body(s, inp):
        se, an = inp
        if an is None:
            return s + se, s
        an = an[..., None] if per_channel else an[..., None, None]
        return an * s + se, s

    last, seen = jax.lax.scan(body, s0, (xs, a_s), reverse=reverse)
    return jnp.moveaxis(seen, 0, 1), last


# ----------------------------------------------------------------------------- per-channel intra-chunk scores


def _channel_factors(cfg: ChunkConfig, G):
    """Anchored factors for secondary chunking. G ``[.., C, Dk]`` fp32.

    qf ``[.., ns, sub, Dk]`` = exp(G_i − G_r) for rows i of sub-chunk a (anchor r = its first row);
    kf ``[.., ns, C, Dk]`` = exp(G_r − G_j) for rows j < r, else 0;
    gs ``[.., ns, sub, Dk]``: G split into sub-chunks (for the elementwise diagonal sub-blocks).
    """
    c, sub = cfg.chunk, cfg.sub
    ns, dk = c // sub, G.shape[-1]
    anchor = G[..., ::sub, :]  # [.., ns, Dk]
    gs = G.reshape(G.shape[:-2] + (ns, sub, dk))
    qf = jnp.exp(gs - anchor[..., :, None, :])
    before = jnp.arange(c)[None, :] < (jnp.arange(ns) * sub)[:, None]  # [ns, C]
    kf = jnp.exp(jnp.where(before[:, :, None], anchor[..., :, None, :] - G[..., None, :, :], -jnp.inf))
    return qf, kf, gs


def _column_decay(gs, j):
    """exp(G_i − G_j) for rows i ≥ j of every sub-chunk, else 0 (fp32 ``[.., ns, sub, Dk]``)."""
    sub = gs.shape[-2]
    g_j = jax.lax.dynamic_index_in_dim(gs, j, axis=gs.ndim - 2, keepdims=True)
    return jnp.exp(jnp.where((jnp.arange(sub) >= j)[:, None], gs - g_j, -jnp.inf))


def _diag_scores(qs, ks, gs):
    """Diagonal sub-blocks ``P_ij = Σ_c q_ic k_jc exp(G_ic − G_jc)`` (i ≥ j), elementwise in fp32, one column
    j at a time (a scan over the sub-chunk's columns keeps the transient memory at the size of q)."""
    def column(_, j):
        k_j = jax.lax.dynamic_index_in_dim(ks, j, axis=ks.ndim - 2, keepdims=True)
        return None, jnp.sum(qs * k_j * _column_decay(gs, j), axis=-1)  # [.., ns, sub_i]

    _, cols = jax.lax.scan(column, None, jnp.arange(gs.shape[-2]))
    return jnp.moveaxis(cols, 0, -1)  # [.., ns, sub_i, sub_j]


def _diag_grads(qs, ks, gs, dpd):
    """Gradients of the diagonal sub-blocks given ``dP`` blocks ``[.., ns, sub_i, sub_j]`` (fp32):
    ``dq_i = Σ_j dP_ij k_j ⊙ exp(G_i − G_j)``, ``dk_j = Σ_i dP_ij q_i ⊙ exp(G_i − G_j)``, column by column."""
    def column(dq, j):
        w = _column_decay(gs, j)
        k_j = jax.lax.dynamic_index_in_dim(ks, j, axis=ks.ndim - 2, keepdims=True)
        dp_j = jax.lax.dynamic_index_in_dim(dpd, j, axis=dpd.ndim - 1, keepdims=False)[..., None]  # [.., ns, sub, 1]
        return dq + dp_j * k_j * w, jnp.sum(dp_j * qs * w, axis=-2)  # dk_j [.., ns, Dk]

    dq, dk_rows = jax.lax.scan(column, jnp.zeros_like(qs), jnp.arange(gs.shape[-2]))
    return dq, jnp.moveaxis(dk_rows, 0, -2)


def _blockdiag(d):
    """``[.., ns, sub, sub]`` -> ``[.., C, C]`` with the blocks on the diagonal."""
    ns, sub = d.shape[-3], d.shape[-1]
    eye = jnp.eye(ns, dtype=d.dtype)
    full = d[..., :, :, None, :] * eye[:, None, :, None]
    return full.reshape(d.shape[:-3] + (ns * sub, ns * sub))


def _diag_blocks(m, ns: int, sub: int):
    """``[.., C, C]`` -> its diagonal blocks ``[.., ns, sub, sub]``."""
    m5 = m.reshape(m.shape[:-2] + (ns, sub, ns, sub))
    return jnp.moveaxis(jnp.diagonal(m5, axis1=-4, axis2=-2), -1, -3)


class _ChannelParts(NamedTuple):
    qs: Array  # [.., ns, sub, Dk] fp32 q rows
    ks: Array  # [.., ns, sub, Dk] fp32 k rows
    q_anch: Array  # [.., ns, sub, Dk] compute dtype, q ⊙ exp(G − G_r)
    k_anch: Array  # [.., ns, C, Dk] compute dtype, k ⊙ exp(G_r − G), 0 for j ≥ r
    qf: Array
    kf: Array
    gs: Array


def _channel_parts(cfg: ChunkConfig, x: _Chunked) -> _ChannelParts:
    c, sub = cfg.chunk, cfg.sub
    ns, dk = c // sub, x.q.shape[-1]
    qf, kf, gs = _channel_factors(cfg, x.G)
    qs = x.q.astype(F32).reshape(x.q.shape[:-2] + (ns, sub, dk))
    ks = x.k.astype(F32).reshape(x.k.shape[:-2] + (ns, sub, dk))
    cdt = x.q.dtype
    q_anch = (qs * qf).astype(cdt)
    k_anch = (x.k.astype(F32)[..., None, :, :] * kf).astype(cdt)
    return _ChannelParts(qs, ks, q_anch, k_anch, qf, kf, gs)


def _anchored_factors(G):
    """``exp(G − m)`` and ``exp(m − G)`` (fp32 ``[Z, N, C, Dk]``), ``m`` the middle of each chunk's and
    channel's range of G: within ``e^{±ANCHOR_SPAN/2}`` on a chunk that is not wide (:func:`_wide_chunks`)."""
    m = 0.5 * (G.max(axis=-2, keepdims=True) + G.min(axis=-2, keepdims=True))
    return jnp.exp(G - m), jnp.exp(m - G)


def _anchored(x: _Chunked, dp):
    """The anchored one-matmul path on every chunk (exact where :func:`_wide_chunks` is False)."""
    cdt = x.q.dtype
    eq, ek = _anchored_factors(x.G)
    qa, ka = _weighted(x.q, eq, cdt), _weighted(x.k, ek, cdt)
    p = _dot("znid,znjd->znij", qa, ka)
    if dp is None:
        return p
    dpc = dp.astype(cdt)
    return p, eq * _dot("znij,znjd->znid", dpc, ka), ek * _dot("znij,znid->znjd", dpc, qa)


def _secondary(cfg: ChunkConfig, x: _Chunked, dp):
    """Secondary chunking on every chunk of ``x`` (exact for any gate)."""
    c, sub = cfg.chunk, cfg.sub
    ns = c // sub
    cdt = x.q.dtype
    cp = _channel_parts(cfg, x)
    p_off = _dot("...aid,...ajd->...aij", cp.q_anch, cp.k_anch)  # [.., ns, sub, C]
    p_diag = _diag_scores(cp.qs, cp.ks, cp.gs)  # [.., ns, sub, sub]
    p = p_off.reshape(p_off.shape[:-3] + (c, c)) + _blockdiag(p_diag)
    if dp is None:
        return p
    dp_off = dp.reshape(dp.shape[:-2] + (ns, sub, c)).astype(cdt)
    dq_off = cp.qf * _dot("...aij,...ajd->...aid", dp_off, cp.k_anch)
    dk_off = jnp.sum(cp.kf * _dot("...aij,...aid->...ajd", dp_off, cp.q_anch), axis=-3)
    dq_diag, dk_diag = _diag_grads(cp.qs, cp.ks, cp.gs, _diag_blocks(dp, ns, sub))
    return p, (dq_off + dq_diag).reshape(x.q.shape), dk_off + dk_diag.reshape(x.k.shape)


def _wide_chunks(G):
    """bool ``[Z, N]``: the chunk's per-channel span ``max_i G_i − min_i G_i`` exceeds ``ANCHOR_SPAN`` somewhere."""
    return jnp.any(G.max(axis=-2) - G.min(axis=-2) > ANCHOR_SPAN, axis=-1)


def _redo_wide_chunks(cfg: ChunkConfig, x: _Chunked, dp, out):
    """``out`` (the anchored results, ``[Z, N, ...]`` leaves) with every wide chunk recomputed by secondary
    chunking, ``WIDE_BATCH`` chunks per step of a loop that runs ``ceil(#wide / WIDE_BATCH)`` times: zero
    times on typical gates, so they pay for the check only.

    The loop's operands and carries are 1-D: XLA:CPU gives a loop's operands the layouts its body prefers and
    computes them before the loop, used or not (measured: transposed copies of q, k and G on every call);
    a 1-D array has one layout, so the reshapes happen inside the body, only when it runs."""
    z, n = x.q.shape[:2]
    m = z * n
    batch = min(WIDE_BATCH, m)
    wide = _wide_chunks(x.G).reshape(m)
    rows_all = jnp.nonzero(wide, size=m + batch, fill_value=m)[0]  # then m: an out-of-range row, dropped
    ins = (x.q, x.k, x.G) + (() if dp is None else (dp,))
    leaves, treedef = jax.tree_util.tree_flatten(out)
    by_chunk = lambda a: a.reshape((m,) + a.shape[2:])  # noqa: E731 - [Z, N, ...] -> [Z·N, ...]

    def step(i, acc):
        picked = jax.lax.dynamic_slice_in_dim(rows_all, i * batch, batch)
        take = [by_chunk(a.reshape(o.shape)).at[picked].get(mode="fill", fill_value=0)[None]
                for a, o in zip(flat_ins, ins)]
        res = _secondary(cfg, x._replace(q=take[0], k=take[1], G=take[2]), take[3] if dp is not None else None)
        return [by_chunk(a.reshape(o.shape)).at[picked].set(r[0], mode="drop").reshape(-1)
                for a, o, r in zip(acc, leaves, jax.tree_util.tree_leaves(res))]

    flat_ins = [a.reshape(-1) for a in ins]
    trips = (jnp.sum(wide, dtype=jnp.int32) + batch - 1) // batch
    acc = jax.lax.fori_loop(0, trips, step, [a.reshape(-1) for a in leaves])
    return jax.tree_util.tree_unflatten(treedef, [a.reshape(o.shape) for a, o in zip(acc, leaves)])


def _channel_intra(cfg: ChunkConfig, x: _Chunked, f: _Factors, dp=None):
    """Per-channel intra-chunk work: the anchored C×C matmul on every chunk, then secondary chunking for the
    chunks whose gates are too wide for it (:func:`_redo_wide_chunks`; none on typical gates).

    Returns ``P`` (fp32 ``[Z, N, C, C]``, masked); given a masked ``dP`` (zero for j ≥ i and across segments)
    also ``Σ_j dP_ij K_j ⊙ exp(G_i − G_j)`` and ``Σ_i dP_ij Q_i ⊙ exp(G_i − G_j)`` (fp32 ``[Z, N, C, Dk]``).
    """
    out = _redo_wide_chunks(cfg, x, dp, _anchored(x, dp))
    if dp is None:
        return jnp.where(f.ok, out, 0.0)
    p, dq, dk = out
    return jnp.where(f.ok, p, 0.0), dq, dk


def _scores(cfg: ChunkConfig, x: _Chunked, f: _Factors):
    """Intra-chunk ``P`` (fp32 ``[Z, N, C, C]``, zero where j > i or across segments), without scale."""
    if cfg.gate == "channel":
        return _channel_intra(cfg, x, f)
    return _dot("znid,znjd->znij", x.q, x.k) * f.gamma


# ----------------------------------------------------------------------------- forward and backward


def _forward(cfg: ChunkConfig, q, k, v, g, h0, resets):
    """o, the final state and, for scalar gates, the chunk-local gate cumsum ``[Z, N, C]`` (a residual: when
    the backward formed it again, XLA:CPU did not always merge the two, nor then anything computed from it;
    retention T = 2k fwd+bwd ran one more C×C dot per chunk, +15%). Per-channel cumsums, as large as k, are
    formed again."""
    x = _split(cfg, q, k, v, g, resets)
    f = _factors(cfg, x)
    cdt = x.q.dtype
    s_ext = _dot("zncd,znce->znde", _weighted(x.k, f.wk, cdt), x.v)
    s_start, s_final = _state_pass(cfg, s_ext, f.a, None if h0 is None else rows(h0))
    o = _dot("zncd,znde->znce", _weighted(x.q, f.wq, cdt), s_start.astype(cdt))
    p = _scores(cfg, x, f)
    o = o + _dot("znij,znje->znie", p.astype(cdt), x.v)
    heads = q.shape[2]
    return from_chunks(o, cfg.length, heads) * cfg.scale, by_head(s_final, heads), \
        x.G if cfg.gate == "scalar" else None


def _chunk_reverse_cumsum(x, seg, ok, tail):
    """``y_t = x_t + y_{t+1}`` unless token t+1 starts a new segment, over the tokens of ``x`` (fp32
    ``[Z, N, C(, Dk)]`` in chunk layout), with ``tail`` (``[Z(, Dk)]``) after the last token, in its segment.
    seg ``[Z, N, C]`` or None; ok the chunks' ``i ≥ j``-and-same-segment mask (``[C, C]`` or ``[Z, N, C, C]``).

    Inside chunks it is one masked C×C matmul (``y_i = Σ_j okᵀ_ij x_j``), across them a carry of chunk sums
    over the N chunks. A cumsum over the whole token axis lowers to a reduce-window that XLA:CPU ran on one
    thread with its elementwise producer fused in (gla fwd+bwd at T = 32k: 275 ms of instruction time, more
    than any matmul); adding ``tail`` into ``x`` as a scatter made the matmul's operand a 116 ms scatter fusion.
    """
    local = _masked_sum(x, ok, transpose=True)
    # chunk n's sum over its first segment (what the chunks before it can receive), then the tail: [Z, N+1(, Dk)]
    first = jnp.concatenate([local[:, :, 0], tail[:, None]], axis=1)
    if seg is None:
        carry = jax.lax.cumsum(first, axis=1, reverse=True)[:, 1:]  # Σ over the chunks after n and the tail
        return local + carry[:, :, None]
    per_row = (lambda m: m[..., None]) if x.ndim == 4 else (lambda m: m)
    # the first token of chunk n+1 continues chunk n's last segment (the tail always does): [Z, N]
    opens = jnp.concatenate([seg[:, 1:, 0] == 0, jnp.ones_like(seg[:, :1, 0], bool)], axis=1)
    spans = seg[:, :, 0] == seg[:, :, -1]  # no reset after the chunk's first token
    m = per_row(jnp.concatenate([spans & opens, jnp.zeros_like(spans[:, :1])], axis=1).astype(F32))
    reach = reverse_affine_scan(jnp.broadcast_to(m, first.shape), first, axis=1)  # y at chunk n's first token
    carry = per_row(opens.astype(F32)) * reach[:, 1:]
    last_segment = per_row((seg == seg[:, :, -1:]).astype(F32))
    return local + last_segment * carry[:, :, None]


def _backward(cfg: ChunkConfig, res, cts):
    q, k, v, g, h0, resets, s_final, big_g = res
    do, dsf = cts
    x = _split(cfg, q, k, v, g, resets, big_g)
    f = _factors(cfg, x)
    cdt = x.q.dtype
    n, heads = x.q.shape[1], q.shape[2]
    h0_rows = None if h0 is None else rows(h0)
    dsf_rows = rows(dsf.astype(F32))
    kw = _weighted(x.k, f.wk, cdt)
    qw = _weighted(x.q, f.wq, cdt)
    s_ext = _dot("zncd,znce->znde", kw, x.v)
    s_start, _ = _state_pass(cfg, s_ext, f.a, h0_rows)
    # the scale is folded into dO: every q-linear path sees scale·do
    d_o = to_chunks(do.astype(F32) * cfg.scale, cfg.chunk, n).astype(cdt)
    ds_q = _dot("zncd,znce->znde", qw, d_o)
    ds_end, ds0 = _state_pass(cfg, ds_q, f.a, dsf_rows, reverse=True)
    # inter-chunk (state) terms
    dq = _dot("znce,znde->zncd", d_o, s_start.astype(cdt))
    dk = _dot("znce,znde->zncd", x.v, ds_end.astype(cdt))
    if f.wq is not None:
        dq = dq * (f.wq if f.wq.ndim == dq.ndim else f.wq[..., None])
    if f.wk is not None:
        dk = dk * (f.wk if f.wk.ndim == dk.ndim else f.wk[..., None])
    dv = _dot("zncd,znde->znce", kw, ds_end.astype(cdt))
    # intra-chunk terms
    dp = _dot("znie,znje->znij", d_o, x.v)
    # The i = j term (Γ_ii = 1) is added after the gate gradient: it cancels exactly in q ⊙ dq − k ⊙ dk,
    # and leaving it out of that difference avoids fp32 cancellation noise when the gates decay fast.
    eye = jnp.eye(cfg.chunk, dtype=bool)
    dp_diag = jnp.diagonal(dp, axis1=-2, axis2=-1)[..., None]  # [Z, N, C, 1]
    if cfg.gate == "channel":
        p, dq_intra, dk_intra = _channel_intra(cfg, x, f, jnp.where(f.ok & ~eye, dp, 0.0))
        dq, dk = dq + dq_intra, dk + dk_intra
    else:
        p = _scores(cfg, x, f)
        da = jnp.where(eye, 0.0, dp * f.gamma).astype(cdt)
        dq = dq + _dot("znij,znjd->znid", da, x.k)
        dk = dk + _dot("znij,znid->znjd", da, x.q)
    dv = dv + _dot("znij,znie->znje", p.astype(cdt), d_o)
    qf32, kf32 = x.q.astype(F32), x.k.astype(F32)
    dg = None
    if g is not None:
        dlogb = qf32 * dq - kf32 * dk  # [Z, N, C, Dk]
        final_term = jnp.sum(rows(s_final) * dsf_rows, axis=-1)  # [Z, Dk]
        if cfg.gate == "scalar":
            dlogb, final_term = jnp.sum(dlogb, axis=-1), jnp.sum(final_term, axis=-1)
        dg = _chunk_reverse_cumsum(dlogb, x.seg, f.ok, final_term)  # the final state sits after the padded end
        dg = from_chunks(dg, cfg.length, heads).astype(g.dtype)
    dq = dq + dp_diag * kf32
    dk = dk + dp_diag * qf32
    dq = from_chunks(dq, cfg.length, heads).astype(q.dtype)
    dk = from_chunks(dk, cfg.length, heads).astype(k.dtype)
    dv = from_chunks(dv, cfg.length, heads).astype(v.dtype)
    dh0 = None if h0 is None else by_head(ds0, heads).astype(h0.dtype)
    return dq, dk, dv, dg, dh0, None


def _one_group(cfg: ChunkConfig) -> ChunkConfig:
    """The config of one group of ``cfg``'s loop (a call of ``cfg.group`` tokens)."""
    return dataclasses.replace(cfg, length=cfg.group, groups=1)


def _grouped_forward(cfg: ChunkConfig, q, k, v, g, h0, resets):
    """o, the final state and what the backward needs beyond the inputs: :func:`_forward`'s residual for
    one group, the groups' (:mod:`seqmix.ops._chunk_groups`) for several."""
    if cfg.groups == 1:
        return _forward(cfg, q, k, v, g, h0, resets)
    sub = _one_group(cfg)
    b, _, h, dk = q.shape
    s0 = jnp.zeros((b, h, dk, v.shape[-1]), F32) if h0 is None else h0.astype(F32)

    def step(xs, state):
        qi, ki, vi, gi, ri = xs
        return _forward(sub, qi, ki, vi, gi, state, ri)

    return _chunk_groups.forward(step, (q, k, v, g, resets), s0, cfg.group, cfg.groups)


def _grouped_backward(cfg: ChunkConfig, res, cts):
    q, k, v, g, h0, resets, s_final, saved = res
    if cfg.groups == 1:
        return _backward(cfg, (q, k, v, g, h0, resets, s_final, saved), cts)
    do, dsf = cts
    sub = _one_group(cfg)

    def step(xs, doi, start, end, big_g, ds_end):
        qi, ki, vi, gi, ri = xs
        dq, dk, dv, dg, ds_start, _ = _backward(sub, (qi, ki, vi, gi, start, ri, end, big_g), (doi, ds_end))
        return (dq, dk, dv, dg, None), ds_start

    (dq, dk, dv, dg, _), ds0 = _chunk_groups.backward(step, (q, k, v, g, resets), do, saved, dsf.astype(F32),
                                                       cfg.group, cfg.groups)
    return dq, dk, dv, dg, None if h0 is None else ds0.astype(h0.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg: ChunkConfig, q, k, v, g, h0, resets):
    o, s_final, _ = _grouped_forward(cfg, q, k, v, g, h0, resets)
    return o, s_final


def _chunked_fwd(cfg, q, k, v, g, h0, resets):
    o, s_final, saved = _grouped_forward(cfg, q, k, v, g, h0, resets)
    return (o, s_final), (q, k, v, g, h0, resets, s_final, saved)


_chunked.defvjp(_chunked_fwd, _grouped_backward)
_chunked_jit = jax.jit(_chunked, static_argnums=(0,))


def gated_chunk(q, k, v, g=None, *, scale: float, initial_state=None, resets=None, chunk_size: int = 64):
    """The chunked recurrence. Returns ``o`` fp32 ``[B, T, H, Dv]`` and the final state fp32 ``[B, H, Dk, Dv]``.

    q, k ``[B, T, H, Dk]`` and v ``[B, T, H, Dv]`` in one dtype (the matmul operand dtype); g fp32 log decay
    ``[B, T, H]`` / ``[B, T, H, Dk]`` / None; initial_state fp32 ``[B, H, Dk, Dv]`` or None; resets bool
    ``[B, T]`` or None. Differentiable in q, k, v, g, initial_state (custom VJP, see the module docstring).
    """
    cfg = make_config(q, g, chunk_size, scale)
    v = v.astype(q.dtype)
    return _chunked_jit(cfg, q, k, v, bounded_log_gate(g), initial_state, resets)


def chunked_call(call):
    """``gated_chunk`` on a prepared :class:`~seqmix.ops._recurrent.RecurrentCall`: (o fp32, final_state)."""
    return gated_chunk(call.q, call.k, call.v, call.g, scale=call.scale, initial_state=call.initial_state,
                       resets=call.resets, chunk_size=call.chunk_size)


# ----------------------------------------------------------------------------- single-token step


def step_inputs(q_t, k_t, v_t, state, scale, name: str):
    """Validate and cast one decode token: returns (q·scale, k, v) fp32, the fp32 state, the scale.

    q_t, k_t ``[B, H, Dk]``, v_t ``[B, H, Dv]``, state ``[B, H, Dk, Dv]`` or None (zeros).
    """
    for arg, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.require_rank(f"{name}: {arg}", x, 3, "[batch, heads, head_dim]")
        _checks.require_float(f"{name}: {arg}", x)
    b, h, dk = q_t.shape
    if k_t.shape != q_t.shape:
        raise ValueError(f"{name}: k_t must have q_t's shape {list(q_t.shape)}; got {list(k_t.shape)}")
    if v_t.shape[:2] != (b, h):
        raise ValueError(f"{name}: v_t must match q_t in [batch, heads] = {[b, h]}; got {list(v_t.shape)}")
    dv = v_t.shape[2]
    if state is None:
        state = jnp.zeros((b, h, dk, dv), F32)
    _checks.require_shape(f"{name}: state", state, (b, h, dk, dv), "[batch, heads, d_k, d_v]")
    scale = 1.0 / math.sqrt(dk) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    f32 = lambda a: jnp.asarray(a, F32)  # noqa: E731
    return f32(q_t) * scale, f32(k_t), f32(v_t), f32(state), scale
