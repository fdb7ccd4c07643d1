"""``moba``: Mixture of Block Attention (MoBA, arXiv 2502.13189): its call, gate, reference, decode step
and family record.

``moba(q, k, v, *, block_size, topk, segment_ids=None, scale=None, return_lse=False, q_offset=None,
block_q=128, block_kv=128, impl=None)`` with q ``[B, Tq, Hq, D]``, k ``[B, S, Hkv, D]``, v
``[B, S, Hkv, Dv]`` (``Hkv`` divides ``Hq``; ``Tq <= S``; query ``i`` sits at position ``q_offset + i``,
default ``S - Tq``; key ``j`` at position ``j``). Returns ``o [B, Tq, Hq, Dv]`` or ``(o, lse [B, Hq, Tq])``.

Semantics (FAMILIES.md §2.3), causal only:

1. Each document (a run of equal ``segment_ids``; the whole row without them) is split into blocks of
   ``block_size`` keys from its first token: a token's block is ``rel // block_size`` (``rel``: its
   position inside the document).
2. Gate (fp32, not differentiated): query ``i`` scores each *past* block ``b`` of its document (blocks
   before its own) by ``q_i · mean_{j ∈ b} k_j``, with the mean of the query head's kv head.
3. Query ``i`` attends to its own block (causally) and the ``topk − 1`` best past blocks (all of them
   when fewer exist; ties go to the lower block). ``topk = 1`` is the own block only: never a silent
   switch to full attention (fla's ``parallel_moba`` does that).
4. Softmax over the attended keys; gradients flow through them only.
5. A query whose gate meets a NaN score (a NaN among its past blocks' keys, or in itself) gets a NaN
   row: its choice would be an artifact of how the sort orders NaN.

Implementations: ``reference`` (the materialized softmax over the selection, here), ``xla``
(:mod:`seqmix.ops.moba_xla`: one flash pass over per-query-tile lists of the key tiles any query of
the tile selected, so unselected tiles are never read) and ``pallas_tpu`` (:mod:`seqmix.ops.tpu.moba`:
the attention flash kernels with step tables per (batch, kv head) and the selection evaluated in-kernel). Decoding: :func:`moba_decode` with a
:class:`MoBACache` (every key, plus a running sum per block: a block joins the gate's pool once it is
complete). Sequence parallelism: :func:`seqmix.parallel.allgather.allgather_moba` (all-gather KV;
the layer runs it through ``SequenceParallel.family_op``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks, _op_docs, _registry, block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention import masked_softmax_reference
from seqmix.ops.attention_call import AttentionCall, finish, prepare_attention
from seqmix.ops.kv_cache import KVCache, init_kv_cache, kv_cache_overflow, update_kv_cache

Array = Any
FAMILY = "moba"
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MoBACall:
    """A validated call: the causal attention call (positions, documents, scale, tiles) and MoBA's settings."""

    attention: AttentionCall  # mask: Causal; kv positions arange(S); q positions q_offset + arange(Tq)
    block_size: int
    topk: int


def _require_runs(segment_ids) -> None:
    """Each id must form one run per row (MoBA's blocks start at a document's first token)."""
    ids = [segment_ids] if not isinstance(segment_ids, (tuple, list)) else list(segment_ids)
    for x in ids:
        if not _checks.is_concrete(x):
            continue
        for row in np.asarray(x):
            starts = row[np.r_[True, row[1:] != row[:-1]]]
            if len(np.unique(starts)) != len(starts):
                raise ValueError("moba: segment_ids must give each document one contiguous run of tokens "
                                 f"(an id reappears after another in row {row.tolist()[:16]}...)")


def prepare_moba(q, k, v, *, block_size, topk, segment_ids=None, scale=None, return_lse: bool = False,
                 q_offset=None, relative_positions=None, block_q: int = 128, block_kv: int = 128) -> MoBACall:
    """Validate ``moba``'s arguments (see the module docstring) into a :class:`MoBACall`.

    ``relative_positions = (q_rel, kv_rel)`` overrides the positions inside documents (sequence
    parallelism passes the gathered ones); ``q_offset`` may be traced (a shard's offset)."""
    for name, val in (("block_size", block_size), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"moba: {name} must be an int >= 1; got {val!r}")
    tq, s = jnp.shape(q)[1], jnp.shape(k)[1]
    if tq > s:
        raise ValueError(f"moba: queries must not outnumber keys (causal, queries at the end); got Tq={tq}, S={s}")
    if segment_ids is not None:
        _require_runs(segment_ids)
    offset = s - tq if q_offset is None else q_offset
    if _checks.is_concrete(offset) and not 0 <= int(offset) <= s - tq:
        raise ValueError(f"moba: q_offset must lie in [0, S - Tq] = [0, {s - tq}]; got {int(offset)}")
    call = prepare_attention(q, k, v, mask=masks_lib.Causal(), segment_ids=segment_ids, scale=scale,
                             return_lse=return_lse, q_positions=offset + jnp.arange(tq, dtype=jnp.int32),
                             relative_positions=relative_positions, block_q=block_q, block_kv=block_kv)
    return MoBACall(call, int(block_size), int(topk))


# ----------------------------------------------------------------------------- the gate


def top_blocks(scores, n_past, topk: int):
    """The gate's choice: the ``topk − 1`` best of each query's past blocks.

    scores: fp32 ``[..., Tq, C]`` (candidate ``c`` is the query's ``c``-th block of its document);
    n_past: int ``[..., Tq]`` broadcastable, the number of past blocks (candidates ``c < n_past`` only).
    Returns ``(chosen, unrankable)``: int32 ``[..., Tq, min(topk − 1, C)]``, the chosen blocks, best
    first (ties: lower block), ``-1`` where fewer past blocks exist; and bool ``[..., Tq]``, queries
    whose candidates include a NaN score (a NaN key or query): no choice is right for them, so the
    caller makes their rows NaN instead of letting the sort's NaN order pick blocks silently."""
    c = scores.shape[-1]
    n = min(topk - 1, c)
    if n <= 0:
        return jnp.zeros(scores.shape[:-1] + (0,), jnp.int32), jnp.zeros(scores.shape[:-1], bool)
    n_past = jnp.asarray(n_past)[..., None]
    valid = jnp.arange(c, dtype=jnp.int32) < n_past
    scores = jax.lax.stop_gradient(scores)
    unrankable = jnp.any(valid & jnp.isnan(scores), -1)
    _, idx = jax.lax.top_k(jnp.where(valid & ~jnp.isnan(scores), scores, -jnp.inf), n)  # ties: lower index
    return jnp.where(jnp.arange(n, dtype=jnp.int32) < n_past, idx.astype(jnp.int32), -1), unrankable


def poison_rows(call: AttentionCall, out, unrankable):
    """``out`` (``o [B, Tq, Hq, Dv]`` or ``(o, lse [B, Hq, Tq])``) with NaN in the rows of the queries the
    gate could not rank; unrankable: bool ``[B, Hkv, G, Tq]``."""
    b, tq, hq, _ = call.q.shape
    rows = unrankable.reshape(b, hq, tq)
    if isinstance(out, tuple):
        o, lse = out
        return jnp.where(rows.transpose(0, 2, 1)[..., None], jnp.nan, o).astype(o.dtype), jnp.where(rows, jnp.nan, lse)
    return jnp.where(rows.transpose(0, 2, 1)[..., None], jnp.nan, out).astype(out.dtype)


def selection_mask(chosen, q_blk, kv_blk):
    """Whether key ``j``'s block is the query's own block or one it chose (the caller ANDs in causality
    and documents). chosen ``[..., Tq, K]``, q_blk ``[..., Tq]``, kv_blk ``[..., S]`` -> bool ``[..., Tq, S]``."""
    ok = q_blk[..., :, None] == kv_blk[..., None, :]
    for i in range(chosen.shape[-1]):
        ok = ok | (chosen[..., i:i + 1] == kv_blk[..., None, :])
    return ok


def _grouped(call: AttentionCall):
    b, tq, hq, d = call.q.shape
    hkv = call.k.shape[2]
    return call.q.astype(jnp.float32).reshape(b, tq, hkv, hq // hkv, d)


# ----------------------------------------------------------------------------- reference


def moba_reference(call: MoBACall):
    """Block means from a dense same-block matrix, the gate over each query's past blocks, and the
    materialized fp32 softmax over the selection (O(S²) memory: small sizes)."""
    a, bs = call.attention, call.block_size
    s = a.k.shape[1]
    kv_blk, q_blk = a.kv_rel // bs, a.q_rel // bs  # [B or 1, S], [B or 1, Tq]
    same = kv_blk[:, :, None] == kv_blk[:, None, :]
    if a.kv_seg is not None:
        same = same & (a.kv_seg[:, :, None] == a.kv_seg[:, None, :])
    kf = a.k.astype(jnp.float32)  # a sum under a mask, not a 0/1 matmul: 0 · inf would spread to every block
    k_mean = jnp.where(same[..., None, None], kf[:, None], 0.0).sum(2)
    k_mean = k_mean / same.sum(-1).astype(jnp.float32)[:, :, None, None]  # [B, S, Hkv, D]: mean of j's block
    nb = -(-s // bs)
    first = jnp.clip((a.q_pos - a.q_rel)[..., None] + bs * jnp.arange(nb), 0, s - 1)  # [B|1, Tq, C]
    first = jnp.broadcast_to(first, (a.k.shape[0],) + first.shape[1:])
    cand = jax.vmap(lambda m, i: m[i])(k_mean, first)  # [B, Tq, C, Hkv, D]
    scores = jnp.einsum("bthgd,btchd->bhgtc", _grouped(a), cand, precision=HIGHEST)
    chosen, unrankable = top_blocks(scores, q_blk[:, None, None], call.topk)
    sel = selection_mask(chosen, q_blk[:, None, None], kv_blk[:, None, None])
    ok = block_meta.full_allowed(a.mask, a.q_pos, a.kv_pos, a.q_rel, a.kv_rel, a.q_seg, a.kv_seg)
    return poison_rows(a, masked_softmax_reference(a, ok[:, None, None] & sel), unrankable)


# ----------------------------------------------------------------------------- decoding


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kv", "block_sums"], meta_fields=["block_size"])
@dataclasses.dataclass(frozen=True)
class MoBACache:
    """MoBA's decode state (a pytree): a full KV cache and the fp32 key sum of every block
    ``block_sums [B, ceil(N / block_size), Hkv, D]`` (block ``c`` holds positions ``[c·bs, (c+1)·bs)``)."""

    kv: KVCache
    block_sums: Array
    block_size: int

    @property
    def next_pos(self):
        """The position of the next token."""
        return self.kv.next_pos


def init_moba_cache(batch: int, kv_heads: int, head_dim: int, *, max_len: int, block_size: int,
                    v_head_dim: int | None = None, dtype=jnp.float32) -> MoBACache:
    """An empty cache for sequences of up to ``max_len`` tokens."""
    kv = init_kv_cache(batch, kv_heads, head_dim, ring=max_len, v_head_dim=v_head_dim, dtype=dtype)
    nb = -(-max_len // block_size)
    return MoBACache(kv, jnp.zeros((batch, nb, kv_heads, head_dim), jnp.float32), int(block_size))


def moba_decode(q, k, v, cache: MoBACache, *, topk: int, scale=None):
    """Append ``T`` tokens (usually 1) and attend from their queries: the same rows as :func:`moba` on
    the whole sequence. q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, ·]``; one document per row (no packing).
    Returns ``(o [B, T, Hq, Dv], cache)``; O(cache length) per token."""
    bs = cache.block_size
    overflow = kv_cache_overflow(cache.kv, masks_lib.Causal(), q.shape[1])
    kv, pos, _ = update_kv_cache(cache.kv, k, v)
    sums = cache.block_sums.at[:, pos // bs].add(k.astype(jnp.float32), mode="drop")
    call = prepare_attention(q, kv.k, kv.v, scale=scale, q_positions=pos, kv_positions=kv.pos)
    scores = jnp.einsum("bthgd,bchd->bhgtc", _grouped(call), sums / bs, precision=HIGHEST)
    chosen, unrankable = top_blocks(scores, pos // bs, topk)  # blocks before the query's own are complete
    kv_blk = jnp.where(kv.pos >= 0, kv.pos // bs, -2)
    ok = (kv.pos >= 0) & (kv.pos <= pos[:, None]) & selection_mask(chosen, pos // bs, kv_blk)
    o = poison_rows(call, masked_softmax_reference(call, ok), unrankable)
    if overflow is not None:  # under jit: NaN rows, never a silently wrong output
        o = jnp.where(overflow, jnp.nan, o).astype(o.dtype)
    return o, MoBACache(kv, sums, bs)


# ----------------------------------------------------------------------------- record


def moba_inputs(fam, key, *, batch: int = 2, seq: int = 64, heads: int = 4, dk: int = 16, dv: int = 16,
                dtype=jnp.float32, regime: str = "typical"):
    """Random inputs ``[B, T, H, D]`` (GQA: ``Hkv = H/2``): 4 blocks, topk 2; "stress": 8 blocks, topk 3."""
    hkv = max(1, heads // 2)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, seq, heads, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq, hkv, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq, hkv, dv), jnp.float32).astype(dtype)
    blocks, topk = (4, 2) if regime == "typical" else (8, 3)
    return _registry.Inputs((q, k, v), {}, {"block_size": max(1, seq // blocks), "topk": topk})


def moba_flops(call: MoBACall) -> float:
    """Useful forward FLOPs, exact without evaluating the gate: query ``i`` attends to ``rel_i mod bs + 1``
    keys of its own block and ``bs`` keys of each of its ``min(topk − 1, rel_i // bs)`` past blocks."""
    a, bs = call.attention, call.block_size
    rel = np.broadcast_to(np.asarray(a.q_rel, np.int64), (a.q.shape[0], a.q.shape[1]))
    pairs = (rel % bs + 1 + np.minimum(call.topk - 1, rel // bs) * bs).sum()
    hq, d = a.q.shape[2:]
    return 2.0 * hq * (d + a.v.shape[-1]) * float(pairs)


DOC = _op_docs.compose(
    "MoBA (Mixture of Block Attention): each query attends to its own block and the top-k − 1 past blocks "
    "its gate picks.",
    """
    Keys are split into blocks of block_size per document. Query i scores its document's past blocks by
    q_i · mean(k over the block) (fp32, not differentiated) and attends, by softmax, to its own block
    (causally) and the topk − 1 best past blocks (all of them if fewer; ties go to the lower block).
    topk = 1 is the own block only (never a switch to full attention). Causal only.
    """,
    {"q": "float ``[B, Tq, Hq, D]`` queries (float32, bfloat16 or float16; q, k, v share one dtype).",
     "k": "``[B, S, Hkv, D]`` keys, ``Hkv`` dividing ``Hq`` (GQA/MQA), ``S >= Tq``.",
     "v": "``[B, S, Hkv, Dv]`` values.",
     "block_size": "keys per block (an int >= 1); a document's last block may be shorter.",
     "topk": "blocks per query, its own block included (an int >= 1).",
     "segment_ids": "int ``[B, T]`` or a pair ``(q_ids [B, Tq], kv_ids [B, S])``: packed documents, each one "
                    "contiguous run; blocks start at each document's first token.",
     "scale": "logit scale; default ``D ** -0.5``.",
     "return_lse": "also return the fp32 log-sum-exp ``[B, Hq, Tq]``.",
     "q_offset": "position of the first query (default ``S - Tq``; may be traced, e.g. a shard's offset).",
     "relative_positions": "``(q_rel, kv_rel)`` positions inside documents (normally derived from "
                           "``segment_ids``; sequence parallelism passes the gathered ones).",
     "block_q": "query tile of the xla form (a multiple of 8).",
     "block_kv": "key tile of the xla form (a multiple of 8).",
     "impl": "None (automatic), or ``\"reference\"``, ``\"xla\"``, ``\"pallas_tpu\"``."},
    "``o`` ``[B, Tq, Hq, Dv]`` in q's dtype, or ``(o, lse)`` with ``return_lse``.",
    """\
import jax
from seqmix import ops
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (1, 1024, 8, 64))
k, v = (jax.random.normal(x, (1, 1024, 2, 64)) for x in (kk, kv))     # GQA 8:2
o = ops.moba(q, k, v, block_size=128, topk=3)                         # own block + 2 chosen
""")


def _describe(call: MoBACall) -> str:
    a = call.attention
    return f"block_size={call.block_size}, topk={call.topk}, tiles {a.block_q}x{a.block_kv}"


def _moba_xla(call: MoBACall):
    from seqmix.ops.moba_xla import moba_xla  # the xla form imports this module's gate

    return moba_xla(call)


def _allgather(*args, **kwargs):
    from seqmix.parallel.allgather import allgather_moba  # parallel imports ops

    return allgather_moba(*args, **kwargs)


# Imported here, below the gate and the call it reads (the kernel glue imports this module's names).
from seqmix.ops.tpu import moba as _tpu_moba  # noqa: E402

moba = _registry.define_family(
    FAMILY, kind="softmax", prepare=prepare_moba, doc=DOC,
    summary="MoBA: own block + top-k gated past blocks (mean-pooled keys), causal, packed documents, GQA.",
    reference=moba_reference, xla=_moba_xla, describe=_describe, kernels=(_tpu_moba.IMPLEMENTATION,),
    args=tuple(_registry.ArgSpec(n, "option", example=e) for n, e in (("block_size", 16), ("topk", 2))),
    decode_doc="moba_decode with MoBACache (full KV cache + running block sums)",
    sequence_parallel=("allgather",), sp_functions={"allgather": _allgather},
    modules=("seqmix.nn.MoBAAttention",), mixers={"moba": "seqmix.nn.moba"},
    make_inputs=moba_inputs, flops=moba_flops)
