"""MoBA's ``xla`` form: the gate on tile windows of block means, then one flash pass over dynamic tile lists.

1. Block means: the keys' fp32 sums per (document, block) by ``segment_sum`` over a global block id
   (``g(j)``: the number of block starts up to key ``j``, minus one), divided by the block's length.
2. Gate: a query tile's candidates are block ids in a window of ``ceil(S / bs) + block_q`` ids (a
   tile's queries sit in consecutive positions, so their documents' past blocks all lie in it): one
   ``[block_q, window]`` matmul per tile, then :func:`seqmix.ops.moba.top_blocks`.
3. Tile lists: per query tile and query head, the key tiles (``block_kv`` keys) that any of its queries
   attends to (own block up to the query, chosen blocks), by a difference array over tile ranges;
   sorted, with their count.
4. Flash: slot ``j`` processes, for every query tile at once, the ``j``-th tile of its list (gathered),
   with the per-token selection as the mask; a ``while`` loop runs as many slots as the longest list.
   Key tiles no query of a tile chose are never read. Backward (``jax.custom_vjp``) recomputes the
   scores per slot and scatter-adds dk, dv into the gathered tiles. Memory: O(T·(D + block_kv)) per head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from seqmix.ops.attention_call import finish
from seqmix.ops.attention_xla import _zero_cotangent
from seqmix.ops.block_meta import pad_to
from seqmix.ops.moba import MoBACall, poison_rows, top_blocks

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block_size: int
    block_q: int
    block_kv: int
    seq_kv: int  # S (keys at positions 0 .. S-1)
    groups: int


def _tiles(x, axis: int, block: int):
    """Split ``axis`` (already padded to a multiple of ``block``) into (tiles, block)."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return x.reshape(shape)


def gate(call: MoBACall):
    """The gate's choice for every query, by query tiles of ``block_q`` (the call's xla tile).

    Returns ``(chosen, unrankable)``: int32 ``[B, Hkv, G, Tq, K]`` (``K = min(topk − 1, blocks)``, the
    chosen past blocks of the query's document, best first, ``-1`` where fewer exist) and bool
    ``[B, Hkv, G, Tq]`` (see :func:`seqmix.ops.moba.top_blocks`)."""
    a, bs = call.attention, call.block_size
    b, tq, hq, d = a.q.shape
    s, hkv = a.k.shape[1], a.k.shape[2]
    g = hq // hkv
    bq = a.block_q
    tp = -(-tq // bq) * bq
    nt, nb = tp // bq, -(-s // bs)
    q_rel = jnp.broadcast_to(a.q_rel, (b, tq))
    kv_rel = jnp.broadcast_to(a.kv_rel, (b, s))

    # block means by global block id (ids increase along the keys; at most S of them)
    gid = jnp.cumsum((kv_rel % bs == 0).astype(jnp.int32), axis=1) - 1  # [B, S]
    seg_sum = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=s))
    sums = seg_sum(a.k.astype(jnp.float32), gid)  # [B, S(ids), Hkv, D]
    counts = seg_sum(jnp.ones((b, s), jnp.float32), gid)
    means = sums / jnp.maximum(counts, 1.0)[:, :, None, None]

    # per query tile, scores against a window of block ids [first id of the tile's first document, + W)
    q_blk = pad_to(q_rel // bs, 1, tp, 0)
    q_gid = jnp.take_along_axis(gid, jnp.clip(a.q_pos, 0, s - 1)[None].repeat(b, 0), axis=1)  # own block's id
    q_first = pad_to(q_gid - q_rel // bs, 1, tp, 0)  # id of block 0 of the query's document
    w = nb + bq
    start = _tiles(q_first, 1, bq)[:, :, 0]  # [B, nt]: tiles' queries are consecutive, ids nondecreasing
    padded = jnp.concatenate([means, jnp.zeros((b, w) + means.shape[2:], means.dtype)], axis=1)
    win = jax.vmap(lambda m, st: m[st[:, None] + jnp.arange(w)])(padded, start)  # [B, nt, W, Hkv, D]
    qf = _tiles(pad_to(a.q.astype(jnp.float32), 1, tp, 0), 1, bq).reshape(b, nt, bq, hkv, g, d)
    scores = jnp.einsum("btqhgd,btwhd->bhgtqw", qf, win, precision=HIGHEST)
    # candidate c of query i is window slot (first_i - start) + c: shift each row to candidate order
    shift = _tiles(q_first, 1, bq) - start[:, :, None]  # [B, nt, bq]; valid candidates stay inside W
    cand = jnp.clip(shift[..., None] + jnp.arange(nb), 0, w - 1)  # [B, nt, bq, nb]
    scores = jnp.take_along_axis(scores, cand[:, None, None], axis=-1)
    chosen, unrankable = top_blocks(scores, _tiles(q_blk, 1, bq)[:, None, None], call.topk)
    chosen = chosen.reshape(b, hkv, g, tp, chosen.shape[-1])[:, :, :, :tq]
    return chosen, unrankable.reshape(b, hkv, g, tp)[..., :tq]


def listed_tiles(call: MoBACall, chosen, block_q: int, block_kv: int, padded_q: int, padded_kv: int):
    """Which key tiles each query tile needs, per query head: bool ``[B, Hkv, G, nt, nu]`` for query
    tiles of ``block_q`` (``nt = padded_q / block_q``) and key tiles of ``block_kv``
    (``nu = padded_kv / block_kv``), by a difference array over each query's key ranges (its own
    block up to itself; each chosen block). chosen: ``[B, Hkv, G, Tq, K]`` from :func:`gate`."""
    a, bs = call.attention, call.block_size
    b, tq = a.q.shape[:2]
    bq, bk = block_q, block_kv
    nt, nu = padded_q // bq, padded_kv // bk
    q_rel = jnp.broadcast_to(a.q_rel, (b, tq))
    tiles = lambda x, fill: _tiles(pad_to(x, x.ndim - 1, padded_q, fill), x.ndim - 1, bq)  # noqa: E731
    ch = jnp.moveaxis(tiles(jnp.moveaxis(chosen, -1, -2), -1), -3, -1)  # [B, Hkv, G, nt, bq, K]
    q_pos = tiles(a.q_pos, -1)  # [nt, bq]
    doc0 = tiles(a.q_pos[None] - q_rel, 0)[:, None, None]  # document start [B, 1, 1, nt, bq]
    qb = tiles(q_rel // bs, 0)[:, None, None]
    rows = lambda x: jnp.broadcast_to(x, ch.shape[:-1])[..., None]  # noqa: E731
    lo = jnp.concatenate([rows(doc0 + qb * bs), doc0[..., None] + ch * bs], -1)
    hi = jnp.concatenate([rows(q_pos), doc0[..., None] + (ch + 1) * bs - 1], -1)
    use = jnp.concatenate([jnp.ones(ch.shape[:-1] + (1,), bool), ch >= 0], -1) & (q_pos >= 0)[..., None]
    lo_t, hi_t = jnp.clip(lo // bk, 0, nu - 1), jnp.clip(hi // bk + 1, 0, nu)
    one = use.astype(jnp.int32)
    shape = ch.shape[:4] + (nu + 1,)
    idx = tuple(jnp.broadcast_to(jnp.arange(n).reshape((n,) + (1,) * (lo.ndim - 1 - i)), lo.shape)
                for i, n in enumerate(shape[:4]))
    diff = jnp.zeros(shape, jnp.int32).at[idx + (lo_t,)].add(one).at[idx + (hi_t,)].add(-one)
    return jnp.cumsum(diff, -1)[..., :nu] > 0


def _metadata(call: MoBACall):
    """Per-query and per-key int metadata, padded to whole tiles, and the gate's choice.

    Returns a dict: q_pos ``[nt, bq]`` (-1 = padding), q_seg / q_blk ``[B, nt, bq]``, chosen
    ``[B, Hkv, G, nt, bq, K]``, k_seg / k_blk ``[B, nu, bk]``, order ``[B, Hkv, G, nt, nu]`` (key
    tiles, listed ones first, ascending), count ``[B, Hkv, G, nt]`` and unrankable ``[B, Hkv, G, Tq]``."""
    a, bs = call.attention, call.block_size
    b, tq = a.q.shape[:2]
    s = a.k.shape[1]
    bq, bk = a.block_q, a.block_kv
    tp, sp = -(-tq // bq) * bq, -(-s // bk) * bk
    q_rel = jnp.broadcast_to(a.q_rel, (b, tq))
    kv_rel = jnp.broadcast_to(a.kv_rel, (b, s))
    q_seg = jnp.zeros((b, tq), jnp.int32) if a.q_seg is None else a.q_seg
    kv_seg = jnp.zeros((b, s), jnp.int32) if a.kv_seg is None else a.kv_seg
    chosen, unrankable = gate(call)
    listed = listed_tiles(call, chosen, bq, bk, tp, sp)
    chosen_t = jnp.moveaxis(_tiles(pad_to(jnp.moveaxis(chosen, -1, -2), 4, tp, -1), 4, bq), -3, -1)
    order = jnp.argsort(~listed, axis=-1, stable=True).astype(jnp.int32)
    return {"q_pos": _tiles(pad_to(a.q_pos, 0, tp, -1), 0, bq), "q_seg": _tiles(pad_to(q_seg, 1, tp, -2), 1, bq),
            "q_blk": _tiles(pad_to(q_rel // bs, 1, tp, 0), 1, bq), "chosen": chosen_t,
            "k_seg": _tiles(pad_to(kv_seg, 1, sp, -1), 1, bk), "k_blk": _tiles(pad_to(kv_rel // bs, 1, sp, -1), 1, bk),
            "order": order, "count": listed.sum(-1), "unrankable": unrankable}


def _slot(st: _Static, meta, j):
    """Slot ``j``: the key tile each (batch, head, query tile) processes and its allowed pairs.

    Returns u ``[B, Hkv, G, nt]`` and allowed bool ``[B, Hkv, G, nt, bq, bk]``."""
    u = meta["order"][..., j]
    active = j < meta["count"]
    b, hkv, g, nt = u.shape
    bi = jnp.arange(b)[:, None, None, None]
    k_pos = u[..., None] * st.block_kv + jnp.arange(st.block_kv)  # [B, Hkv, G, nt, bk]
    k_seg = meta["k_seg"][bi, u]
    k_blk = meta["k_blk"][bi, u]
    q_pos = meta["q_pos"][:, :, None]  # [nt, bq, 1]
    ok = (k_pos[..., None, :] <= q_pos) & (k_pos[..., None, :] < st.seq_kv)
    ok = ok & (k_seg[..., None, :] == meta["q_seg"][:, None, None, :, :, None])
    sel = k_blk[..., None, :] == meta["q_blk"][:, None, None, :, :, None]
    chosen = meta["chosen"]
    for i in range(chosen.shape[-1]):
        sel = sel | (k_blk[..., None, :] == chosen[..., i:i + 1])
    return u, ok & sel & active[..., None, None]


def _gather_tiles(x, u):
    """x ``[B, Hkv, nu, bk, F]``, u ``[B, Hkv, G, nt]`` -> ``[B, Hkv, G, nt, bk, F]``."""
    bi = jnp.arange(x.shape[0])[:, None, None, None]
    hi = jnp.arange(x.shape[1])[None, :, None, None]
    return x[bi, hi, u]


def _scatter_tiles(acc, u, contrib):
    """Add contrib ``[B, Hkv, G, nt, bk, F]`` into acc ``[B, Hkv, nu, bk, F]`` at tiles u (repeats add up)."""
    bi = jnp.arange(acc.shape[0])[:, None, None, None]
    hi = jnp.arange(acc.shape[1])[None, :, None, None]
    return acc.at[bi, hi, u].add(contrib)


def _q_tiles(st: _Static, x):
    """Rows ``[B, Tq, Hq, F]`` -> ``[B, Hkv, G, nt, bq, F]`` (zero padded)."""
    b, tq, hq, f = x.shape
    tp = -(-tq // st.block_q) * st.block_q
    xt = pad_to(x, 1, tp, 0).reshape(b, tp // st.block_q, st.block_q, hq // st.groups, st.groups, f)
    return xt.transpose(0, 3, 4, 1, 2, 5)


def _kv_tiles(st: _Static, x):
    """Keys ``[B, S, Hkv, F]`` -> ``[B, Hkv, nu, bk, F]`` (zero padded)."""
    sp = -(-x.shape[1] // st.block_kv) * st.block_kv
    return _tiles(jnp.swapaxes(pad_to(x, 1, sp, 0), 1, 2), 2, st.block_kv)


def _layout(st: _Static, q, k, v):
    return _q_tiles(st, q), _kv_tiles(st, k), _kv_tiles(st, v)


def _unlayout_rows(x, tq):
    """``[B, Hkv, G, nt, bq, F]`` -> ``[B, Tq, Hq, F]``."""
    b, hkv, g, nt, bq, f = x.shape
    return x.transpose(0, 3, 4, 1, 2, 5).reshape(b, nt * bq, hkv * g, f)[:, :tq]


def _n_slots(meta):
    return jnp.max(meta["count"])


def _forward(st: _Static, q, k, v, meta):
    qt, kt, vt = _layout(st, q, k, v)
    shape = qt.shape[:-1]
    init = (jnp.zeros(shape, jnp.float32) - jnp.inf, jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (v.shape[-1],), jnp.float32))

    def body(j, carry):
        m, l, acc = carry
        u, ok = _slot(st, meta, j)
        kj, vj = _gather_tiles(kt, u), _gather_tiles(vt, u)
        s = jnp.einsum("bhgtqd,bhgtkd->bhgtqk", qt, kj, preferred_element_type=jnp.float32,
                       precision=HIGHEST) * st.scale
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        pv = jnp.einsum("bhgtqk,bhgtkd->bhgtqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32,
                        precision=HIGHEST)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    m, l, acc = jax.lax.fori_loop(0, _n_slots(meta), body, init)
    empty = l == 0  # padding rows only: every real query attends to itself
    l_safe = jnp.where(empty, 1.0, l)
    o = acc / l_safe[..., None]
    lse = jnp.where(empty, -jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe))
    b, tq, hq, _ = q.shape
    lse_out = _unlayout_rows(lse[..., None], tq)[..., 0].transpose(0, 2, 1)  # [B, Hq, Tq]
    return _unlayout_rows(o, tq).astype(q.dtype), lse_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, meta):
    return _forward(st, q, k, v, meta)


def _flash_fwd(st, q, k, v, meta):
    o, lse = _forward(st, q, k, v, meta)
    return (o, lse), (q, k, v, o, lse, meta)


def _flash_bwd(st, res, cts):
    q, k, v, o, lse, meta = res
    do, dlse = cts
    b, tq, hq, _ = q.shape
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    qt, kt, vt = _layout(st, q, k, v)
    dot = _q_tiles(st, do.astype(q.dtype))
    rows = lambda x: _q_tiles(st, jnp.swapaxes(x, 1, 2)[..., None])[..., 0]  # noqa: E731 [B, Hq, Tq] -> tiles
    lse_t, delta_t = rows(lse), rows(delta)
    lse_safe = jnp.where(lse_t == -jnp.inf, 0.0, lse_t)
    init = (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32))

    def body(j, carry):
        dq, dk, dv = carry
        u, ok = _slot(st, meta, j)
        kj, vj = _gather_tiles(kt, u), _gather_tiles(vt, u)
        s = jnp.einsum("bhgtqd,bhgtkd->bhgtqk", qt, kj, preferred_element_type=jnp.float32,
                       precision=HIGHEST) * st.scale
        p = jnp.where(ok, jnp.exp(s - lse_safe[..., None]), 0.0)
        dp = jnp.einsum("bhgtqd,bhgtkd->bhgtqk", dot, vj, preferred_element_type=jnp.float32, precision=HIGHEST)
        ds = (p * (dp - delta_t[..., None])).astype(q.dtype)
        dq = dq + st.scale * jnp.einsum("bhgtqk,bhgtkd->bhgtqd", ds, kj, preferred_element_type=jnp.float32,
                                        precision=HIGHEST)
        dk_j = st.scale * jnp.einsum("bhgtqk,bhgtqd->bhgtkd", ds, qt, preferred_element_type=jnp.float32,
                                     precision=HIGHEST)
        dv_j = jnp.einsum("bhgtqk,bhgtqd->bhgtkd", p.astype(do.dtype), dot, preferred_element_type=jnp.float32,
                          precision=HIGHEST)
        return dq, _scatter_tiles(dk, u, dk_j), _scatter_tiles(dv, u, dv_j)

    dq, dk, dv = jax.lax.fori_loop(0, _n_slots(meta), body, init)
    s = k.shape[1]
    unkv = lambda x: jnp.swapaxes(x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]), 1, 2)[:, :s]  # noqa: E731
    return (_unlayout_rows(dq, tq).astype(q.dtype), unkv(dk).astype(k.dtype), unkv(dv).astype(v.dtype),
            jax.tree_util.tree_map(_zero_cotangent, meta))


_flash.defvjp(_flash_fwd, _flash_bwd)


def moba_xla(call: MoBACall):
    """MoBA by the tile-list flash pass above; the same results as :func:`seqmix.ops.moba.moba_reference`."""
    a = call.attention
    st = _Static(float(a.scale), call.block_size, a.block_q, a.block_kv, a.k.shape[1], a.groups)
    meta = jax.lax.stop_gradient(_metadata(call))
    unrankable = meta.pop("unrankable")
    o, lse = _flash(st, a.q, a.k, a.v, meta)
    return poison_rows(a, finish(a, o, lse), unrankable)
