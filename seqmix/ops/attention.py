"""Softmax attention: the ``attention`` op, its reference, its decode entry point and its family record.

``attention(q, k, v, *, mask=None, segment_ids=None, scale=None, sink_logits=None, soft_cap=None,
return_lse=False, impl=None)`` with q ``[B, Tq, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]``,
``Hkv`` dividing ``Hq`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated).
Returns ``o [B, Tq, Hq, Dv]`` (input dtype) or ``(o, lse)`` with ``lse`` fp32 ``[B, Hq, Tq]``.
``mask=None`` is full (bidirectional) attention; pass ``masks.Causal()`` for a decoder.

Semantics (FAMILIES.md §2.1): ``s_ij = soft_cap·tanh(scale·q_i·k_j / soft_cap)``, disallowed pairs set
to ``-inf`` before ``exp``; a per-head sink logit ``b_h`` joins the denominator only. A row with no
allowed key gives ``o = 0`` and ``lse = -inf`` (``b_h`` with a sink logit) and zero, finite gradients.

Implementations: ``reference`` (materialized fp32 softmax, here), ``xla``
(:mod:`seqmix.ops.attention_xla`), ``pallas_tpu`` (:mod:`seqmix.ops.tpu.attention`), ``pallas_gpu`` (:mod:`seqmix.ops.gpu.attention`),
``cudnn`` (:mod:`seqmix.ops.gpu.attention_cudnn`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqmix.ops import _op_docs, _registry, block_meta
from seqmix.ops.attention_call import AttentionCall, finish, prepare_attention
from seqmix.ops.attention_xla import attention_xla
from seqmix.ops.kv_cache import KVCache, cache_size_for, init_kv_cache, kv_cache_overflow, update_kv_cache
from seqmix.ops.gpu import attention as gpu_attention
from seqmix.ops.gpu import attention_cudnn
from seqmix.ops.tpu import attention as tpu_attention

Array = Any
HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["AttentionCall", "KVCache", "attention", "attention_decode", "attention_reference", "cache_size_for",
           "init_kv_cache", "merge_lse", "prepare_attention", "update_kv_cache"]


# ----------------------------------------------------------------------------- reference


def attention_reference(call: AttentionCall):
    """Materialized fp32 softmax (HIGHEST precision): the spec every other implementation meets."""
    ok = block_meta.full_allowed(call.mask, call.q_pos, call.kv_pos, call.q_rel, call.kv_rel,
                                call.q_seg, call.kv_seg)
    return masked_softmax_reference(call, ok[:, None, None])


def masked_softmax_reference(call: AttentionCall, ok):
    """The reference softmax of ``call`` over the pairs ``ok`` allows (the call's mask is not read).

    ok: bool broadcastable to ``[B, Hkv, G, Tq, S]`` (G = Hq / Hkv query heads per kv head), e.g. a
    ``[B, 1, 1, Tq, S]`` mask or a per-head selection (MoBA)."""
    b, tq, hq, d = call.q.shape
    hkv, g = call.k.shape[2], call.groups
    q = call.q.astype(jnp.float32).reshape(b, tq, hkv, g, d)
    s = jnp.einsum("bthgd,bshd->bhgts", q, call.k.astype(jnp.float32), precision=HIGHEST) * call.scale
    if call.soft_cap is not None:
        s = call.soft_cap * jnp.tanh(s / call.soft_cap)
    ok = jnp.broadcast_to(ok, s.shape)
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
    empty = l == 0  # fully masked rows; NaN inputs keep l (and so o and lse) NaN
    l_safe = jnp.where(empty, 1.0, l)
    o = jnp.einsum("bhgts,bshd->bthgd", p / l_safe[..., None], call.v.astype(jnp.float32), precision=HIGHEST)
    o = o.reshape(b, tq, hq, -1).astype(call.q.dtype)
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(l_safe)).reshape(b, hq, tq)
    return finish(call, o, lse)


# ----------------------------------------------------------------------------- LSE merge


def merge_lse(o1, lse1, o2, lse2):
    """Combine two partial softmax results over disjoint key sets (FAMILIES.md §3.4), in fp32.

    o: ``[B, T, H, Dv]``; lse: ``[B, H, T]``. Rows where both lse are -inf give ``o = 0``, ``lse = -inf``.
    """
    m = jnp.maximum(lse1, lse2)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w1, w2 = jnp.exp(lse1 - m_safe), jnp.exp(lse2 - m_safe)
    tot = w1 + w2
    empty = tot == 0  # NaN partials stay NaN
    tot_safe = jnp.where(empty, 1.0, tot)
    to_bthd = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # noqa: E731
    o = (to_bthd(w1) * o1.astype(jnp.float32) + to_bthd(w2) * o2.astype(jnp.float32)) / to_bthd(tot_safe)
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(tot_safe))
    return o, lse


# ----------------------------------------------------------------------------- decoding


def attention_decode(q, k, v, cache: KVCache, *, mask=None, segment_ids=None, scale=None, sink_logits=None, soft_cap=None, impl=None):
    """Append the new tokens' k/v to ``cache`` and attend from their queries.

    q ``[B, T, Hq, D]`` (usually T = 1), k/v ``[B, T, Hkv, D]``, segment_ids ``[B, T]`` or None.
    Returns ``(o [B, T, Hq, Dv], cache)``; ``o`` equals the parallel op's rows for these tokens as
    long as the cache holds every key the mask allows (size it with :func:`cache_size_for`).
    The new tokens see each other causally only if ``mask`` is causal (as in prefill).
    """
    # Attend over the old cache plus the new tokens, then store only the survivors: a prefill longer
    # than a window ring must still see every key of its own prompt.
    overflow = kv_cache_overflow(cache, mask, q.shape[1])
    new_cache, pos, rel = update_kv_cache(cache, k, v, segment_ids)
    b, t = q.shape[:2]
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    cat = lambda a, b_: jnp.concatenate([a, b_.astype(a.dtype)], axis=1)  # noqa: E731
    out = attention(q, cat(cache.k, k), cat(cache.v, v), mask=mask, scale=scale, sink_logits=sink_logits,
                    soft_cap=soft_cap, q_positions=pos, kv_positions=jnp.concatenate([cache.pos, pos]),
                    segment_ids=None if segment_ids is None else (seg, cat(cache.seg, seg)),
                    relative_positions=(rel, cat(cache.rel, rel)), impl=impl)
    if overflow is not None:  # under jit: the rows are NaN, never silently wrong (see kv_cache_overflow)
        out = jnp.where(overflow, jnp.nan, out).astype(out.dtype)
    return out, new_cache


# ----------------------------------------------------------------------------- record


def attention_inputs(fam, key, *, batch: int = 2, seq: int = 64, heads: int = 4, dk: int = 16, dv: int = 16,
                     dtype=jnp.float32, regime: str = "typical", kv_heads: int | None = None, kv_seq: int | None = None):
    """Random inputs: q ``[B, T, H, Dk]``, k ``[B, S, Hkv, Dk]``, v ``[B, S, Hkv, Dv]`` (``Hkv = H/2`` by
    default: GQA), a causal mask; "stress" adds sink logits and a soft cap."""
    from seqmix.ops import masks

    hkv = kv_heads or max(1, heads // 2)
    s = seq if kv_seq is None else kv_seq
    kq, kk, kv, ks = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, seq, heads, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, s, hkv, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, s, hkv, dv), jnp.float32).astype(dtype)
    arrays, options = {}, {"mask": masks.Causal()}
    if regime != "typical":
        arrays["sink_logits"] = jax.random.normal(ks, (heads,), jnp.float32).astype(dtype)
        options["soft_cap"] = 5.0
    return _registry.Inputs((q, k, v), arrays, options)


DOC = _op_docs.compose(
    "Softmax attention with composable masks, packed documents, GQA/MQA, sink logits and a logit soft cap.",
    """
    o_i = Σ_j softmax_j(s_ij) v_j,   s_ij = soft_cap · tanh(scale · q_i·k_j / soft_cap)   (allowed pairs only)

    ``mask=None`` is full (bidirectional) attention: pass ``masks.Causal()`` for a decoder. A query row
    with no allowed key gives ``o = 0`` and ``lse = -inf`` (and zero gradients). Non-finite inputs give
    non-finite outputs (never zeros). Empty blocks of the mask are skipped, not computed.
    """,
    {"q": "float ``[B, Tq, Hq, D]`` queries (float32, bfloat16 or float16; q, k, v share one dtype).",
     "k": "``[B, S, Hkv, D]`` keys; ``Hkv`` divides ``Hq`` (GQA/MQA: query head h reads kv head "
          "``h // (Hq // Hkv)``, K/V are never repeated).",
     "v": "``[B, S, Hkv, Dv]`` values.",
     "mask": "a ``seqmix.ops.masks`` mask: ``Causal()``, ``SlidingWindow(left, right)``, ``LocalWindow(w)``, "
             "``ChunkedCausal(c)``, ``Sinks(n)``, ``streaming(w, n)``, ``PrefixLM(p)``, ``PowerAttention(block)``, "
             "``Explicit(bool [Tq, S])``, combined with ``&`` and ``|``; None = full attention.",
     "segment_ids": "int ``[B, T]`` (self-attention) or a pair ``(q_ids [B, Tq], kv_ids [B, S])``: packed "
                    "documents attend only within themselves; masks see positions inside each document.",
     "scale": "logit scale; default ``D ** -0.5``.",
     "sink_logits": "float ``[Hq]`` per-head sink logit joining every row's softmax denominator "
                    "(gpt-oss / StreamingLLM style); ``-inf`` = no sink.",
     "soft_cap": "cap logits with ``soft_cap · tanh(s / soft_cap)`` (Gemma 2); None = no cap.",
     "return_lse": "also return the log-sum-exp of each row's logits.",
     "q_positions": "int ``[Tq]`` query positions; default ``S - Tq + arange(Tq)`` (bottom-right aligned).",
     "kv_positions": "int ``[S]`` key positions; default ``arange(S)``; a negative position marks a "
                     "missing key (an empty cache slot).",
     "relative_positions": "``(q_rel, kv_rel)`` positions inside documents (normally derived from "
                           "``segment_ids``).",
     "block_q": "query rows per block of the chunked form (a multiple of 8; a performance knob; default: "
                "chosen per platform, mask and length by ``seqmix.ops.xla_tiles``).",
     "block_kv": "key rows per block of the chunked form (a multiple of 8; default as for ``block_q``).",
     "impl": "``None`` (the fastest implementation with test evidence on this platform, else ``\"xla\"``), "
             "or a name: ``\"reference\"`` (materialized fp32 softmax), ``\"xla\"`` (online softmax over "
             "blocks, O(T·block) memory), ``\"pallas_tpu\"``, ``\"pallas_gpu\"`` (Mosaic GPU kernels), ``\"cudnn\"`` (GPU: "
             "``jax.nn.dot_product_attention(implementation=\"cudnn\")``). ``seqmix.ops.explain`` says which runs and why."},
    "``o`` ``[B, Tq, Hq, Dv]`` in the input dtype, or ``(o, lse)`` with ``lse`` float32 ``[B, Hq, Tq]`` when "
    "``return_lse=True``.",
    """\
import jax, jax.numpy as jnp
from seqmix import ops
from seqmix.ops import masks as M
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (2, 128, 8, 64))
k, v = (jax.random.normal(x, (2, 128, 2, 64)) for x in (kk, kv))     # GQA 8:2
o = ops.attention(q, k, v, mask=M.Causal())                           # [2, 128, 8, 64]
o, lse = ops.attention(q, k, v, mask=M.streaming(32, 4), return_lse=True)
""")


def attention_flops(call: AttentionCall) -> float:
    """Useful forward FLOPs: ``Q Kᵀ`` and ``P V`` on allowed pairs only, 2·(D + Dv) per pair and q head
    (FAMILIES.md §7; exact for every mask, counted by evaluating it)."""
    hq, d = call.q.shape[2:]
    return 2.0 * hq * (d + call.v.shape[-1]) * block_meta.count_allowed(call)


attention = _registry.define_family(
    "attention", kind="softmax", prepare=prepare_attention, doc=DOC,
    summary="Softmax attention with composable masks, packed documents, GQA/MQA, sink logits and soft cap.",
    reference=attention_reference, xla=attention_xla,
    describe=lambda c: f"block_q={c.block_q}, block_kv={c.block_kv}",
    kernels=(tpu_attention.IMPLEMENTATION, gpu_attention.IMPLEMENTATION, attention_cudnn.IMPLEMENTATION),
    args=(_registry.ArgSpec("mask", "option"),
          _registry.ArgSpec("sink_logits", "per_head", ("H",), gate=None),
          _registry.ArgSpec("soft_cap", "option")),
    decode_doc="KV cache (full, window ring, sinks + window): attention_decode; a cache per head group "
               "(PerHead masks: attention_decode_per_head)",
    sequence_parallel=("ring", "ulysses", "allgather"),
    modules=("seqmix.nn.Attention",),
    mixers={"attn": "seqmix.nn.attention", "swa": "seqmix.nn.attention", "chunk": "seqmix.nn.attention",
            "stream": "seqmix.nn.attention", "power": "seqmix.nn.attention", "duo": "seqmix.nn.attention"},
    make_inputs=attention_inputs, flops=attention_flops)
