"""Attention with a mask per kv head (DuoAttention's retrieval and streaming heads in one layer).

A :class:`~seqmix.ops.sparse_masks.PerHead` assigns each kv head (and its query heads) one of a few
ordinary masks. Attention splits the heads into one group per mask and runs the ``attention`` op on
each group, so every implementation, kernel, block-metadata path and strategy serves each group as it
serves that mask alone; the groups' outputs go back to head order.

Decoding keeps one :class:`~seqmix.ops.kv_cache.KVCache` per group, each sized for its own mask
(:func:`~seqmix.ops.kv_cache.cache_size_for`): a full cache for DuoAttention's retrieval heads, a ring
of sinks + window for its streaming heads.

Shapes: q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]``, sink_logits ``[Hq]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops.kv_cache import cache_size_for, init_kv_cache
from seqmix.ops.sparse_masks import PerHead

Array = Any


def _check(masks, q, k, owner: str) -> int:
    if not isinstance(masks, PerHead):
        raise ValueError(f"{owner}: masks must be a seqmix.ops.masks.PerHead; got {type(masks).__name__}")
    hq, hkv = q.shape[2], k.shape[2]
    if len(masks.index) != hkv:
        raise ValueError(f"{owner}: the PerHead mask names {len(masks.index)} kv heads; k has {hkv}")
    if hq % hkv:
        raise ValueError(f"{owner}: kv heads ({hkv}) must divide query heads ({hq})")
    return hq // hkv


def _query_heads(kv_heads: np.ndarray, groups: int) -> np.ndarray:
    return (kv_heads[:, None] * groups + np.arange(groups)).reshape(-1)


def split_heads(masks: PerHead, q, k, v, sink_logits, attend: Callable, *, owner: str = "per-head attention"):
    """``attend(q_g, k_g, v_g, mask, sink_g) -> o_g`` (or ``(o_g, lse_g)``) per mask group, the results
    in head order: o ``[B, T, Hq, Dv]`` (lse ``[B, Hq, T]``)."""
    g = _check(masks, q, k, owner)
    outs, heads = [], []
    for mask, kv_heads in masks.groups():
        qh = _query_heads(kv_heads, g)
        sink = None if sink_logits is None else sink_logits[qh]
        outs.append(attend(q[:, :, qh], k[:, :, kv_heads], v[:, :, kv_heads], mask, sink))
        heads.append(qh)
    back = np.argsort(np.concatenate(heads))
    if isinstance(outs[0], tuple):
        o = jnp.concatenate([x[0] for x in outs], axis=2)[:, :, back]
        lse = jnp.concatenate([x[1] for x in outs], axis=1)[:, back]
        return o, lse
    return jnp.concatenate(outs, axis=2)[:, :, back]


def attention_per_head(q, k, v, *, masks: PerHead, sink_logits=None, **kwargs):
    """``seqmix.ops.attention`` with kv head ``h``'s mask ``masks.masks[masks.index[h]]``; ``kwargs`` as
    for ``attention`` (segment_ids, positions, scale, soft_cap, return_lse, impl, block sizes)."""
    from seqmix.ops.attention import attention

    def attend(q, k, v, mask, sink):
        return attention(q, k, v, mask=mask, sink_logits=sink, **kwargs)

    return split_heads(masks, q, k, v, sink_logits, attend, owner="attention_per_head")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerHeadCache:
    """One :class:`~seqmix.ops.kv_cache.KVCache` per mask group of a :class:`PerHead` mask (in ``masks.groups()`` order)."""

    caches: tuple

    @property
    def next_pos(self):
        """The position of the next token."""
        return self.caches[0].next_pos


def init_per_head_cache(batch: int, masks: PerHead, head_dim: int, *, max_len: int, v_head_dim: int | None = None,
                        dtype=jnp.float32) -> PerHeadCache:
    """An empty cache for sequences of up to ``max_len`` tokens, each group's sized for its mask."""
    caches = []
    for mask, kv_heads in masks.groups():
        ring, n_sink = cache_size_for(mask, max_len)
        caches.append(init_kv_cache(batch, len(kv_heads), head_dim, ring=ring, n_sink=n_sink,
                                    v_head_dim=v_head_dim, dtype=dtype))
    return PerHeadCache(tuple(caches))


def attention_decode_per_head(q, k, v, cache: PerHeadCache, *, masks: PerHead, sink_logits=None, **kwargs):
    """``seqmix.ops.attention_decode`` per mask group; returns ``(o [B, T, Hq, Dv], cache)``."""
    from seqmix.ops.attention import attention_decode

    if not isinstance(cache, PerHeadCache) or len(cache.caches) != len(masks.groups()):
        raise ValueError("attention_decode_per_head: cache must come from init_per_head_cache with these masks")
    caches = iter(cache.caches)
    new = []

    def attend(q, k, v, mask, sink):
        o, c = attention_decode(q, k, v, next(caches), mask=mask, sink_logits=sink, **kwargs)
        new.append(c)
        return o

    o = split_heads(masks, q, k, v, sink_logits, attend, owner="attention_decode_per_head")
    return o, PerHeadCache(tuple(new))


__all__ = ["PerHeadCache", "attention_decode_per_head", "attention_per_head", "init_per_head_cache",
           "split_heads"]
