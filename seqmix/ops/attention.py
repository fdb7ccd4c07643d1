"""Softmax attention: the ``attention`` op, its reference, its chunked XLA form and its decode step.

``attention(q, k, v, *, mask=None, segment_ids=None, scale=None, sink_logits=None, soft_cap=None,
return_lse=False, impl=None)`` with q ``[B, Tq, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]``,
``Hkv`` dividing ``Hq`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated).
Returns ``o [B, Tq, Hq, Dv]`` (input dtype) or ``(o, lse)`` with ``lse`` fp32 ``[B, Hq, Tq]``.

Semantics (FAMILIES.md §2.1): ``s_ij = soft_cap·tanh(scale·q_i·k_j / soft_cap)``, disallowed pairs set
to ``-inf`` before ``exp``; a per-head sink logit ``b_h`` joins the denominator only. A row with no
allowed key gives ``o = 0`` and ``lse = -inf`` (``b_h`` with a sink logit) and zero, finite gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks, _registry
from seqmix.ops import masks as masks_lib

Array = Any
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A validated attention call. Arrays are at the API layout; integer metadata is int32."""

    q: Array  # [B, Tq, Hq, D]
    k: Array  # [B, S, Hkv, D]
    v: Array  # [B, S, Hkv, Dv]
    mask: masks_lib.Mask
    q_pos: Array  # [Tq]
    kv_pos: Array  # [S]; negative = no key here (padding, empty cache slot)
    q_rel: Array  # [B or 1, Tq]
    kv_rel: Array  # [B or 1, S]
    q_seg: Array | None  # [B, Tq]
    kv_seg: Array | None  # [B, S]
    scale: float
    sink_logits: Array | None  # [Hq]
    soft_cap: float | None
    return_lse: bool
    block_q: int
    block_kv: int

    @property
    def groups(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


def _default_block(length: int, preferred: int) -> int:
    return min(preferred, max(8, -(-length // 8) * 8))


def prepare_attention(q, k, v, *, mask=None, segment_ids=None, scale=None, sink_logits=None,
                      soft_cap=None, return_lse=False, q_positions=None, kv_positions=None,
                      relative_positions=None, block_q=128, block_kv=128) -> AttentionCall:
    """Validate ``attention``'s arguments (see the module docstring) into an :class:`AttentionCall`.

    Extra keywords: ``q_positions [Tq]`` / ``kv_positions [S]`` (int32, default bottom-right aligned;
    a negative kv position marks a missing key), ``relative_positions = (q_rel, kv_rel)`` (positions
    inside segments, normally derived from ``segment_ids``), ``block_q`` / ``block_kv`` (XLA tiles).
    ``segment_ids`` is ``[B, T]`` for self-attention or a pair ``(q_seg [B, Tq], kv_seg [B, S])``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.require_rank(name, x, 4, "[batch, seq, heads, head_dim]")
        _checks.require_float(name, x)
    _checks.require_same_dtype(q=q, k=k, v=v)
    b, tq, hq, d = q.shape
    _, s, hkv, _ = k.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"q, k, v must share the batch size; got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim must equal q head_dim {d}; got k {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [batch, seq, heads] = {list(k.shape[:3])}; got v {list(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide q heads ({hq}) for GQA/MQA; got q {list(q.shape)}, k {list(k.shape)}")
    if tq == 0 or s == 0:
        raise ValueError(f"sequence lengths must be >= 1; got Tq={tq}, S={s}")
    if mask is None:
        mask = masks_lib.Full()
    if not isinstance(mask, masks_lib.Mask):
        raise ValueError(f"mask must be a seqmix.ops.masks.Mask or None; got {type(mask).__name__}")
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    soft_cap = _checks.require_positive("soft_cap", soft_cap)
    if sink_logits is not None:
        _checks.require_float("sink_logits", sink_logits)
        _checks.require_shape("sink_logits", sink_logits, (hq,), "[q_heads]")
    if q_positions is None:
        q_positions = s - tq + jnp.arange(tq, dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(s, dtype=jnp.int32)
    q_pos = _checks.require_int_array("q_positions", q_positions, (tq,), "[q_seq]")
    kv_pos = _checks.require_int_array("kv_positions", kv_positions, (s,), "[kv_seq]")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be [B, T] or a pair (q_segment_ids, kv_segment_ids)")
            q_seg = _checks.require_int_array("segment_ids[0]", segment_ids[0], (b, tq), "[batch, q_seq]")
            kv_seg = _checks.require_int_array("segment_ids[1]", segment_ids[1], (b, s), "[batch, kv_seq]")
        else:
            if tq != s:
                raise ValueError(f"a single segment_ids array needs Tq == S (self-attention); got Tq={tq}, S={s}: pass (q_seg, kv_seg)")
            q_seg = kv_seg = _checks.require_int_array("segment_ids", segment_ids, (b, tq), "[batch, seq]")
    if relative_positions is None:
        q_rel = masks_lib.segment_relative(q_pos, q_seg)
        kv_rel = masks_lib.segment_relative(kv_pos, kv_seg)
    else:
        if not isinstance(relative_positions, (tuple, list)) or len(relative_positions) != 2:
            raise ValueError("relative_positions must be a pair (q_rel [B or 1, Tq], kv_rel [B or 1, S])")
        q_rel = _checks.require_int_array("relative_positions[0]", relative_positions[0],
                                          (jnp.shape(relative_positions[0])[0], tq), "[batch or 1, q_seq]")
        kv_rel = _checks.require_int_array("relative_positions[1]", relative_positions[1],
                                           (jnp.shape(relative_positions[1])[0], s), "[batch or 1, kv_seq]")
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(val, int) or val < 1 or val % 8:
            raise ValueError(f"{name} must be a positive multiple of 8; got {val!r}")
    return AttentionCall(q, k, v, mask, q_pos, kv_pos, q_rel, kv_rel, q_seg, kv_seg, scale,
                         sink_logits, soft_cap, bool(return_lse), _default_block(tq, block_q),
                         _default_block(s, block_kv))


def _finish(call: AttentionCall, o, lse):
    return (o, lse) if call.return_lse else o


# ----------------------------------------------------------------------------- reference


def attention_reference(call: AttentionCall):
    """Materialized fp32 softmax (HIGHEST precision): the spec every other implementation meets."""
    b, tq, hq, d = call.q.shape
    hkv, g = call.k.shape[2], call.groups
    q = call.q.astype(jnp.float32).reshape(b, tq, hkv, g, d)
    s = jnp.einsum("bthgd,bshd->bhgts", q, call.k.astype(jnp.float32), precision=HIGHEST) * call.scale
    if call.soft_cap is not None:
        s = call.soft_cap * jnp.tanh(s / call.soft_cap)
    ok = masks_lib.full_allowed(call.mask, call.q_pos, call.kv_pos, call.q_rel, call.kv_rel,
                                call.q_seg, call.kv_seg)
    ok = jnp.broadcast_to(ok[:, None, None], s.shape)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, -1)
    if call.sink_logits is not None:
        sink = call.sink_logits.astype(jnp.float32).reshape(1, hkv, g, 1)
        m = jnp.maximum(m, sink)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
    l = p.sum(-1)
    if call.sink_logits is not None:
        l = l + jnp.exp(sink - m_safe)
    l_safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhgts,bshd->bthgd", p / l_safe[..., None], call.v.astype(jnp.float32), precision=HIGHEST)
    o = o.reshape(b, tq, hq, -1).astype(call.q.dtype)
    lse = jnp.where(l > 0, m_safe + jnp.log(l_safe), -jnp.inf).reshape(b, hq, tq)
    return _finish(call, o, lse)


# ----------------------------------------------------------------------------- chunked XLA


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: masks_lib.Mask
    scale: float
    soft_cap: float | None
    block_q: int
    block_kv: int
    has_sink: bool
    has_seg: bool
    padded_q: int  # Tq rounded up to block_q
    padded_kv: int  # S rounded up to block_kv


def _pad_axis(x, axis, size, value):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_edge(x, axis, size):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode="edge")


def _blocks(x, axis, block):
    """Split ``axis`` into [n, block] and move n to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _scores(st: _Static, qi, kj):
    """fp32 scores [B, Hkv, G, bq, bk] (soft-capped) and the tanh needed by the backward."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32,
                   precision=HIGHEST) * st.scale
    if st.soft_cap is None:
        return s, None
    t = jnp.tanh(s / st.soft_cap)
    return st.soft_cap * t, t


def _block_allowed(st: _Static, qmeta, kmeta):
    """[B, 1, 1, bq, bk] allowed pairs inside one (q block, kv block)."""
    qpos, qrel, qseg = qmeta
    kpos, krel, kseg = kmeta
    ok = st.mask.allowed(masks_lib.Coords(qpos[None, :, None], qrel[:, :, None]),
                         masks_lib.Coords(kpos[None, None, :], krel[:, None, :]))
    ok = ok & (kpos >= 0)[None, None, :]
    if st.has_seg:
        ok = ok & (qseg[:, :, None] == kseg[:, None, :])
    return ok[:, None, None]


def _layout(call: AttentionCall):
    """Pad to block multiples and split into blocks; compute the block metadata once."""
    b, tq, hq, d = call.q.shape
    s, hkv = call.k.shape[1], call.k.shape[2]
    tp = -(-tq // call.block_q) * call.block_q
    sp = -(-s // call.block_kv) * call.block_kv
    st = _Static(call.mask, call.scale, call.soft_cap, call.block_q, call.block_kv,
                 call.sink_logits is not None, call.q_seg is not None, tp, sp)
    q_valid = jnp.arange(tp) < tq
    q_pos = _pad_edge(call.q_pos, 0, tp)
    kv_pos = _pad_axis(call.kv_pos, 0, sp, -1)
    q_rel = _pad_edge(jnp.broadcast_to(call.q_rel, (b, tq)), 1, tp)
    kv_rel = _pad_edge(jnp.broadcast_to(call.kv_rel, (b, s)), 1, sp)
    if st.has_seg:
        q_seg, kv_seg = _pad_edge(call.q_seg, 1, tp), _pad_edge(call.kv_seg, 1, sp)
    else:
        q_seg, kv_seg = jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32)
    cls = masks_lib.classify_blocks(st.mask, q_pos, kv_pos, q_rel, kv_rel,
                                    q_seg if st.has_seg else None, kv_seg if st.has_seg else None,
                                    q_valid, st.block_q, st.block_kv)
    qmeta = (_blocks(q_pos, 0, st.block_q), _blocks(q_rel, 1, st.block_q), _blocks(q_seg, 1, st.block_q))
    kmeta = (_blocks(kv_pos, 0, st.block_kv), _blocks(kv_rel, 1, st.block_kv), _blocks(kv_seg, 1, st.block_kv))
    return st, (cls, qmeta, kmeta)


def _q_blocks(x, hkv, block):
    """[B, T, Hq, D] -> [nq, B, Hkv, G, bq, D]."""
    b, t, hq, d = x.shape
    x = x.reshape(b, t // block, block, hkv, hq // hkv, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _kv_blocks(x, block):
    """[B, S, Hkv, D] -> [nk, B, Hkv, bk, D]."""
    b, s, h, d = x.shape
    return x.reshape(b, s // block, block, h, d).transpose(1, 0, 3, 2, 4)


def _flash_forward(st: _Static, q, k, v, sink, cls, qmeta, kmeta):
    """Online softmax over kv blocks for every q block. Returns o [nq,B,Hkv,G,bq,Dv] f32, lse [nq,B,Hkv,G,bq]."""
    hkv = k.shape[2]
    qb, kb, vb = _q_blocks(q, hkv, st.block_q), _kv_blocks(k, st.block_kv), _kv_blocks(v, st.block_kv)
    _, b, _, g, bq, _ = qb.shape
    dv = v.shape[-1]

    def q_block(args):
        qi, qm, cls_i = args

        def kv_step(carry, xs):
            kj, vj, km, c = xs

            def compute(masked):
                def f(carry):
                    m, l, acc = carry
                    s, _ = _scores(st, qi, kj)
                    if masked:
                        s = jnp.where(_block_allowed(st, qm, km), s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(-1))
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    corr = jnp.exp(m - m_use)
                    p = jnp.exp(s - m_use[..., None])
                    pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj,
                                    preferred_element_type=jnp.float32, precision=HIGHEST)
                    return m_new, corr * l + p.sum(-1), corr[..., None] * acc + pv
                return f

            return jax.lax.switch(c, [lambda c_: c_, compute(True), compute(False)], carry), None

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, dv), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, kmeta, cls_i))
        if st.has_sink:
            bias = sink.astype(jnp.float32).reshape(1, hkv, g, 1)
            m2 = jnp.maximum(m, bias)
            corr = jnp.exp(m - m2)
            l, acc, m = l * corr + jnp.exp(bias - m2), acc * corr[..., None], m2
        l_safe = jnp.where(l > 0, l, 1.0)
        o = jnp.where((l > 0)[..., None], acc / l_safe[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
        return o, lse

    return jax.lax.map(q_block, (qb, qmeta, cls))


def _unblock_o(o, b, tq, hq):
    """[nq, B, Hkv, G, bq, Dv] -> [B, Tq, Hq, Dv] (padding dropped)."""
    nq, _, hkv, g, bq, dv = o.shape
    return o.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hq, dv)[:, :tq]


def _unblock_lse(lse, b, tq, hq):
    """[nq, B, Hkv, G, bq] -> [B, Hq, Tq]."""
    nq, _, hkv, g, bq = lse.shape
    return lse.transpose(1, 2, 3, 0, 4).reshape(b, hq, nq * bq)[:, :, :tq]


def _flash_backward(st: _Static, q, k, v, lse_b, do, dlse, cls, qmeta, kmeta):
    """dq, dk, dv (f32, padded layout) by recomputing each block's probabilities from the lse."""
    hkv = k.shape[2]
    qb, kb, vb = _q_blocks(q, hkv, st.block_q), _kv_blocks(k, st.block_kv), _kv_blocks(v, st.block_kv)
    dob = _q_blocks(do, hkv, st.block_q)
    # delta = rowsum(dO * O) - dlse, folded in by the caller into dlse_b
    lse_safe = jnp.where(lse_b == -jnp.inf, jnp.inf, lse_b)

    def q_block(dkv, args):
        qi, doi, lse_i, delta_i, qm, cls_i = args

        def kv_step(dq, xs):
            kj, vj, km, c = xs

            def compute(masked):
                def f(dq):
                    s, t = _scores(st, qi, kj)
                    if masked:
                        s = jnp.where(_block_allowed(st, qm, km), s, -jnp.inf)
                    p = jnp.exp(s - lse_i[..., None])
                    dp = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32, precision=HIGHEST)
                    ds = p * (dp - delta_i[..., None])
                    if t is not None:
                        ds = ds * (1.0 - t * t)
                    ds_c = ds.astype(qi.dtype)
                    dq = dq + st.scale * jnp.einsum("bhgqk,bhkd->bhgqd", ds_c, kj, preferred_element_type=jnp.float32, precision=HIGHEST)
                    dk = st.scale * jnp.einsum("bhgqk,bhgqd->bhkd", ds_c, qi, preferred_element_type=jnp.float32, precision=HIGHEST)
                    dv = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32, precision=HIGHEST)
                    return dq, (dk, dv)
                return f

            def skip(dq):
                zk = jnp.zeros(kj.shape, jnp.float32)
                return dq, (zk, jnp.zeros(vj.shape, jnp.float32))

            return jax.lax.switch(c, [skip, compute(True), compute(False)], dq)

        dq0 = jnp.zeros(qi.shape, jnp.float32)
        dq, (dk, dv) = jax.lax.scan(kv_step, dq0, (kb, vb, kmeta, cls_i))
        return (dkv[0] + dk, dkv[1] + dv), dq

    delta = dlse  # already rowsum(dO*O) - dlse, blocked like lse
    init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(q_block, init, (qb, dob, lse_safe, delta, qmeta, cls))
    return dq, dk, dv


def _unblock_kv(x, b, s):
    """[nk, B, Hkv, bk, D] -> [B, S, Hkv, D]."""
    nk, _, h, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, h, d)[:, :s]


def _lse_blocks(lse, hkv, block):
    """[B, Hq, Tp] -> [nq, B, Hkv, G, bq]."""
    b, hq, t = lse.shape
    return lse.reshape(b, hkv, hq // hkv, t // block, block).transpose(3, 0, 1, 2, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sink, meta):
    return _flash_fwd(st, q, k, v, sink, meta)[0]


def _flash_fwd(st, q, k, v, sink, meta):
    cls, qmeta, kmeta = meta
    b, tq, hq, _ = q.shape
    tp, sp = st.padded_q, st.padded_kv
    qp, kp, vp = _pad_axis(q, 1, tp, 0), _pad_axis(k, 1, sp, 0), _pad_axis(v, 1, sp, 0)
    o_b, lse_b = _flash_forward(st, qp, kp, vp, sink, cls, qmeta, kmeta)
    o = _unblock_o(o_b, b, tq, hq).astype(q.dtype)
    lse = _unblock_lse(lse_b, b, tq, hq)
    return (o, lse), (q, k, v, sink, meta, o, lse)


def _flash_bwd(st, res, cts):
    q, k, v, sink, meta, o, lse = res
    do, dlse = cts
    cls, qmeta, kmeta = meta
    b, tq, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    tp, sp = st.padded_q, st.padded_kv
    dlse = jnp.zeros_like(lse) if dlse is None else dlse
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    qp, kp, vp = _pad_axis(q, 1, tp, 0), _pad_axis(k, 1, sp, 0), _pad_axis(v, 1, sp, 0)
    dop = _pad_axis(do.astype(q.dtype), 1, tp, 0)
    lse_b = _lse_blocks(_pad_axis(lse, 2, tp, -jnp.inf), hkv, st.block_q)
    delta_b = _lse_blocks(_pad_axis(delta, 2, tp, 0.0), hkv, st.block_q)
    dq_b, dk_b, dv_b = _flash_backward(st, qp, kp, vp, lse_b, dop, delta_b, cls, qmeta, kmeta)
    dq = _unblock_o(dq_b, b, tq, hq).astype(q.dtype)
    dk = _unblock_kv(dk_b, b, s).astype(k.dtype)
    dv = _unblock_kv(dv_b, b, s).astype(v.dtype)
    dsink = None
    if st.has_sink:
        # d b_h = -sum_{batch, rows} exp(b_h - lse_i) * (D_i - dlse_i)   (FAMILIES.md §2.1)
        w = jnp.exp(sink.astype(jnp.float32)[None, :, None] - jnp.where(lse == -jnp.inf, jnp.inf, lse))
        w = jnp.where(jnp.isfinite(lse), w, 1.0)  # a row with no key has lse = b_h: weight 1
        dsink = (-(w * delta).sum((0, 2))).astype(sink.dtype)
    zero_meta = jax.tree_util.tree_map(_zero_cotangent, meta)
    return dq, dk, dv, dsink, zero_meta


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_xla(call: AttentionCall):
    """Chunked online softmax: O(T·block) memory forward and backward, empty blocks skipped."""
    st, meta = _layout(call)
    sink = call.sink_logits if call.sink_logits is not None else jnp.zeros((call.q.shape[2],), call.q.dtype)
    o, lse = _flash(st, call.q, call.k, call.v, sink, meta)
    return _finish(call, o, lse)


# ----------------------------------------------------------------------------- LSE merge


def merge_lse(o1, lse1, o2, lse2):
    """Combine two partial softmax results over disjoint key sets (FAMILIES.md §3.4), in fp32.

    o: ``[B, T, H, Dv]``; lse: ``[B, H, T]``. Rows where both lse are -inf give ``o = 0``, ``lse = -inf``.
    """
    m = jnp.maximum(lse1, lse2)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w1, w2 = jnp.exp(lse1 - m_safe), jnp.exp(lse2 - m_safe)
    tot = w1 + w2
    tot_safe = jnp.where(tot > 0, tot, 1.0)
    to_bthd = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # noqa: E731
    o = (to_bthd(w1) * o1.astype(jnp.float32) + to_bthd(w2) * o2.astype(jnp.float32)) / to_bthd(tot_safe)
    lse = jnp.where(tot > 0, m_safe + jnp.log(tot_safe), -jnp.inf)
    return o, lse


# ----------------------------------------------------------------------------- decoding


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "pos", "seg", "rel", "next_pos", "seg_id", "seg_start"],
                   meta_fields=["n_sink"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A KV cache of ``n_sink`` fixed sink slots followed by a ring of ``ring`` slots (a pytree).

    A full cache is a ring as long as the longest sequence; a sliding window of ``w`` keys needs a
    ring of ``w``; StreamingLLM adds ``n_sink`` slots that keep the stream's first tokens.
    k ``[B, N, Hkv, D]``, v ``[B, N, Hkv, Dv]``, pos ``[N]`` (-1 = empty), seg/rel ``[B, N]``,
    next_pos ``[]`` (position of the next token), seg_id/seg_start ``[B]`` (current segment and where
    it began); ``n_sink`` is static.
    """

    k: Array
    v: Array
    pos: Array
    seg: Array
    rel: Array
    next_pos: Array
    seg_id: Array
    seg_start: Array
    n_sink: int = 0

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def ring(self) -> int:
        return self.n_slots - self.n_sink

    def _replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


def init_kv_cache(batch: int, kv_heads: int, head_dim: int, *, ring: int, n_sink: int = 0,
                  v_head_dim: int | None = None, dtype=jnp.float32) -> KVCache:
    """An empty cache with ``n_sink + ring`` slots."""
    if ring < 1 or n_sink < 0:
        raise ValueError(f"ring must be >= 1 and n_sink >= 0; got ring={ring}, n_sink={n_sink}")
    n = n_sink + ring
    dv = head_dim if v_head_dim is None else v_head_dim
    return KVCache(
        k=jnp.zeros((batch, n, kv_heads, head_dim), dtype), v=jnp.zeros((batch, n, kv_heads, dv), dtype),
        pos=jnp.full((n,), -1, jnp.int32), seg=jnp.full((batch, n), -1, jnp.int32),
        rel=jnp.zeros((batch, n), jnp.int32), next_pos=jnp.zeros((), jnp.int32),
        seg_id=jnp.full((batch,), -1, jnp.int32), seg_start=jnp.zeros((batch,), jnp.int32), n_sink=int(n_sink))


def cache_size_for(mask: masks_lib.Mask | None, max_len: int) -> tuple[int, int]:
    """(ring, n_sink) for a cache that serves ``mask`` over sequences of up to ``max_len`` tokens."""
    recent, n_sink = (None, 0) if mask is None else mask.cache_extent()
    ring = max_len if recent is None else max(1, min(recent, max_len))
    return ring, min(n_sink, max_len)


def _slots(pos, n_sink: int, ring: int):
    return jnp.where(pos < n_sink, pos, n_sink + (pos - n_sink) % ring)


def update_kv_cache(cache: KVCache, k, v, segment_ids=None) -> tuple[KVCache, Array, Array]:
    """Append ``T`` tokens (k ``[B, T, Hkv, D]``, v ``[B, T, Hkv, Dv]``, segment_ids ``[B, T]``).

    Returns the cache and the new tokens' positions ``[T]`` and segment-relative positions ``[B, T]``.
    Tokens are written to ``slot(t) = t`` for ``t < n_sink``, else ``n_sink + (t - n_sink) % ring``;
    only the survivors of this update (sinks and the last ``ring`` others) are written.
    """
    b, t = k.shape[:2]
    ring, n_sink = cache.ring, cache.n_sink
    if segment_ids is not None and n_sink:
        raise NotImplementedError("packed decoding (segment_ids) with sink slots is not supported: "
                                  "sink slots keep the stream's first tokens, not each document's")
    pos = cache.next_pos + jnp.arange(t, dtype=jnp.int32)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    prev = jnp.concatenate([cache.seg_id[:, None], seg[:, :-1]], axis=1)
    starts = (seg != prev) | (pos[None, :] == 0)
    idx = jnp.where(starts, pos[None, :], jnp.concatenate([cache.seg_start[:, None], jnp.full((b, t - 1), -1, jnp.int32)], 1))
    seg_start = jax.lax.cummax(idx, axis=1)
    rel = pos[None, :] - seg_start
    last = pos[-1]
    survive = (pos < n_sink) | (pos > last - ring)
    slot = jnp.where(survive, _slots(pos, n_sink, ring), cache.n_slots)  # out of range: dropped
    new = cache._replace(
        k=cache.k.at[:, slot].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[:, slot].set(v.astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[slot].set(pos, mode="drop"),
        seg=cache.seg.at[:, slot].set(seg, mode="drop"),
        rel=cache.rel.at[:, slot].set(rel, mode="drop"),
        next_pos=cache.next_pos + t, seg_id=seg[:, -1], seg_start=seg_start[:, -1])
    return new, pos, rel


def attention_decode(q, k, v, cache: KVCache, *, mask=None, segment_ids=None, scale=None, sink_logits=None, soft_cap=None, impl=None):
    """Append the new tokens' k/v to ``cache`` and attend from their queries.

    q ``[B, T, Hq, D]`` (usually T = 1), k/v ``[B, T, Hkv, D]``, segment_ids ``[B, T]`` or None.
    Returns ``(o [B, T, Hq, Dv], cache)``; ``o`` equals the parallel op's rows for these tokens as
    long as the cache holds every key the mask allows (size it with :func:`cache_size_for`).
    The new tokens see each other causally only if ``mask`` is causal (as in prefill).
    """
    # Attend over the old cache plus the new tokens, then store only the survivors: a prefill longer
    # than a window ring must still see every key of its own prompt.
    new_cache, pos, rel = update_kv_cache(cache, k, v, segment_ids)
    b, t = q.shape[:2]
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    cat = lambda a, b_: jnp.concatenate([a, b_.astype(a.dtype)], axis=1)  # noqa: E731
    out = attention(q, cat(cache.k, k), cat(cache.v, v), mask=mask, scale=scale, sink_logits=sink_logits,
                    soft_cap=soft_cap, q_positions=pos, kv_positions=jnp.concatenate([cache.pos, pos]),
                    segment_ids=None if segment_ids is None else (seg, cat(cache.seg, seg)),
                    relative_positions=(rel, cat(cache.rel, rel)), impl=impl)
    cache = new_cache
    return out, cache


# ----------------------------------------------------------------------------- registration

attention = _registry.define_family(
    "attention", prepare_attention, decode="KV cache (full, window ring, sinks + window)",
    summary="Softmax attention with composable masks, packed documents, GQA/MQA, sink logits and soft cap.",
    reference=attention_reference, xla=attention_xla, describe=lambda c: f"block_q={c.block_q}, block_kv={c.block_kv}")
_registry.register_module("attention", "Attention")
