"""The chunked XLA form of ``attention``: online softmax over kv blocks with a hand-written backward.

O(T·block) memory forward and backward (``jax.custom_vjp``; residuals q, k, v, o, lse). Each q block
loops over its band of kv blocks, from the first to the last non-empty one (block metadata from
:mod:`seqmix.ops.block_meta`); empty blocks inside the band are skipped with ``lax.switch``; partial
blocks evaluate the pair predicate. Algorithm: FAMILIES.md §3.1 (forward) and §3.3 (backward).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.softmax_math import sink_grad
from seqmix.ops import block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention_call import AttentionCall, finish
from seqmix.ops.block_meta import pad_to

Array = Any
HIGHEST = jax.lax.Precision.HIGHEST


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


def _blocks(x, axis, block):
    """Split ``axis`` into [n, block] and move n to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _mm(spec, a, b):
    """fp32-accumulated einsum at HIGHEST precision (every matmul here)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=HIGHEST)


def _scores(st: _Static, qi, kj):
    """fp32 scores [B, Hkv, G, bq, bk] (soft-capped) and the tanh needed by the backward."""
    s = _mm("bhgqd,bhkd->bhgqk", qi, kj) * st.scale
    if st.soft_cap is None:
        return s, None
    t = jnp.tanh(s / st.soft_cap)
    return st.soft_cap * t, t


def _block_allowed(st: _Static, qmeta, kmeta):
    """[B, 1, 1, bq, bk] allowed pairs inside one (q block, kv block)."""
    qpos, qrel, qseg = qmeta
    kpos, krel, kseg = kmeta
    ok = block_meta.pair_allowed(st.mask, qpos[None, :, None], qrel[:, :, None],
                                 qseg[:, :, None] if st.has_seg else None, kpos[None, None, :],
                                 krel[:, None, :], kseg[:, None, :] if st.has_seg else None)
    return ok[:, None, None]


def _layout(call: AttentionCall):
    """Pad to block multiples and split into blocks; compute the block metadata once."""
    b, tq = call.q.shape[:2]
    s = call.k.shape[1]
    tp = -(-tq // call.block_q) * call.block_q
    sp = -(-s // call.block_kv) * call.block_kv
    st = _Static(call.mask, call.scale, call.soft_cap, call.block_q, call.block_kv,
                 call.sink_logits is not None, call.q_seg is not None, tp, sp)
    c = block_meta.pad_coordinates(call, tp, sp)
    cls = block_meta.classify_padded(st.mask, c, st.block_q, st.block_kv)
    q_seg = c.q_seg if st.has_seg else jnp.zeros((b, tp), jnp.int32)
    kv_seg = c.kv_seg if st.has_seg else jnp.zeros((b, sp), jnp.int32)
    qmeta = (_blocks(c.q_pos, 0, st.block_q), _blocks(c.q_rel, 1, st.block_q), _blocks(q_seg, 1, st.block_q))
    kmeta = (_blocks(c.kv_pos, 0, st.block_kv), _blocks(c.kv_rel, 1, st.block_kv), _blocks(kv_seg, 1, st.block_kv))
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


def _at(j, tree):
    """Block ``j`` of every leaf (a dynamic index on the leading axis)."""
    return jax.tree_util.tree_map(lambda x: x[j], tree)


def _over_band(cls_row, body, init):
    """``body(j, carry)`` for the kv blocks ``j`` from the first to the last non-empty one of a q block's
    row of block classes (none when the row is empty), in order.

    A loop over only that band, not a scan over every kv block with a switch: an empty block still costs a
    loop step and a switch dispatch (~55 µs each on CPU, measured), which dominated sparse masks (a 2-D neighborhood on
    128×128 tokens has 5% non-empty blocks). Empty blocks inside the band are still skipped by the switch.
    """
    nk = cls_row.shape[0]
    idx = jnp.arange(nk, dtype=jnp.int32)
    nonempty = cls_row != masks_lib.EMPTY
    hi = jnp.max(jnp.where(nonempty, idx + 1, 0))
    lo = jnp.minimum(jnp.min(jnp.where(nonempty, idx, nk)), hi)
    return jax.lax.fori_loop(lo, hi, body, init)


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
                    pv = _mm("bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj)
                    return m_new, corr * l + p.sum(-1), corr[..., None] * acc + pv
                return f

            return jax.lax.switch(c, [lambda c_: c_, compute(True), compute(False)], carry)

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, dv), jnp.float32))
        m, l, acc = _over_band(cls_i, lambda j, carry: kv_step(carry, _at(j, (kb, vb, kmeta, cls_i))), init)
        if st.has_sink:
            bias = sink.astype(jnp.float32).reshape(1, hkv, g, 1)
            m2 = jnp.maximum(m, bias)
            m2_use = jnp.where(m2 == -jnp.inf, 0.0, m2)  # a -inf sink on a fully masked row: no NaN
            corr = jnp.exp(m - m2_use)
            l, acc, m = l * corr + jnp.exp(bias - m2_use), acc * corr[..., None], m2
        # Only a fully masked row has l == 0 (o = 0, lse = -inf); a NaN from the inputs stays NaN.
        empty = l == 0
        l_safe = jnp.where(empty, 1.0, l)
        o = jnp.where(empty[..., None], 0.0, acc / l_safe[..., None])
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
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


def _zeros_transposed(x):
    """fp32 zeros shaped like ``x`` with its last two axes swapped."""
    return jnp.zeros(x.shape[:-2] + (x.shape[-1], x.shape[-2]), jnp.float32)


def _flash_backward(st: _Static, q, k, v, lse_b, do, dlse, cls, qmeta, kmeta):
    """dq, dk, dv (f32, padded layout) by recomputing each block's probabilities from the lse.

    dk and dv are accumulated transposed, ``dKᵀ += Qᵀ dS`` and ``dVᵀ += dOᵀ P`` with ``Qᵀ``, ``dOᵀ`` formed
    once per q block: as ``dSᵀ Q`` and ``Pᵀ dO`` the dots contract the major axis of the ``[bq, bk]`` tiles,
    and XLA:CPU transposed both tiles at every step (T = 8192, causal: 190 of 1245 ms, more than any dot).
    """
    hkv = k.shape[2]
    qb, kb, vb = _q_blocks(q, hkv, st.block_q), _kv_blocks(k, st.block_kv), _kv_blocks(v, st.block_kv)
    dob = _q_blocks(do, hkv, st.block_q)
    # delta = rowsum(dO * O) - dlse, folded in by the caller into dlse_b
    lse_safe = jnp.where(lse_b == -jnp.inf, jnp.inf, lse_b)

    def q_block(dkv, args):
        qi, doi, lse_i, delta_i, qm, cls_i = args
        qi_t, doi_t = jnp.moveaxis(qi, -1, 2), jnp.moveaxis(doi, -1, 2)  # [B, Hkv, D, G, bq]

        def kv_step(dq, xs):
            kj, vj, km, c = xs

            def compute(masked):
                def f(dq):
                    s, t = _scores(st, qi, kj)
                    if masked:
                        s = jnp.where(_block_allowed(st, qm, km), s, -jnp.inf)
                    p = jnp.exp(s - lse_i[..., None])
                    dp = _mm("bhgqd,bhkd->bhgqk", doi, vj)
                    ds = p * (dp - delta_i[..., None])
                    if t is not None:
                        ds = ds * (1.0 - t * t)
                    ds_c = ds.astype(qi.dtype)
                    dq = dq + st.scale * _mm("bhgqk,bhkd->bhgqd", ds_c, kj)
                    dk_t = st.scale * _mm("bhdgq,bhgqk->bhdk", qi_t, ds_c)
                    dv_t = _mm("bhdgq,bhgqk->bhdk", doi_t, p.astype(doi.dtype))
                    return dq, (dk_t, dv_t)
                return f

            def skip(dq):
                return dq, (_zeros_transposed(kj), _zeros_transposed(vj))

            return jax.lax.switch(c, [skip, compute(True), compute(False)], dq)

        def band_step(j, carry):
            dq, dk_all, dv_all = carry
            dq, (dk, dv) = kv_step(dq, _at(j, (kb, vb, kmeta, cls_i)))
            return dq, dk_all.at[j].add(dk), dv_all.at[j].add(dv)

        dq, dk, dv = _over_band(cls_i, band_step, (jnp.zeros(qi.shape, jnp.float32),) + dkv)
        return (dk, dv), dq

    delta = dlse  # already rowsum(dO*O) - dlse, blocked like lse
    init = (_zeros_transposed(kb), _zeros_transposed(vb))  # [nk, B, Hkv, D, bk]
    (dk_t, dv_t), dq = jax.lax.scan(q_block, init, (qb, dob, lse_safe, delta, qmeta, cls))
    return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


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
    qp, kp, vp = pad_to(q, 1, tp, 0), pad_to(k, 1, sp, 0), pad_to(v, 1, sp, 0)
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
    qp, kp, vp = pad_to(q, 1, tp, 0), pad_to(k, 1, sp, 0), pad_to(v, 1, sp, 0)
    dop = pad_to(do.astype(q.dtype), 1, tp, 0)
    lse_b = _lse_blocks(pad_to(lse, 2, tp, -jnp.inf), hkv, st.block_q)
    delta_b = _lse_blocks(pad_to(delta, 2, tp, 0.0), hkv, st.block_q)
    dq_b, dk_b, dv_b = _flash_backward(st, qp, kp, vp, lse_b, dop, delta_b, cls, qmeta, kmeta)
    dq = _unblock_o(dq_b, b, tq, hq).astype(q.dtype)
    dk = _unblock_kv(dk_b, b, s).astype(k.dtype)
    dv = _unblock_kv(dv_b, b, s).astype(v.dtype)
    dsink = None
    if st.has_sink:
        dsink = sink_grad(sink, lse, delta).astype(sink.dtype)  # FAMILIES.md §2.1
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
    return finish(call, o, lse)
