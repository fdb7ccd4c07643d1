"""KV caches for decoding softmax attention: full, sliding-window ring, sinks + window (a pytree).

Overflow: a ring overwrites its oldest slot. That is exact when the cache serves the mask (a ring at
least as long as a sliding window, as many sink slots as the mask keeps: what :func:`cache_size_for`
gives); otherwise (a full cache for a causal or full mask) writing past its ``n_sink + ring`` slots
would drop keys the mask still allows, so ``attention_decode`` raises ValueError when the cache's fill
is known (outside jit) and returns NaN rows under jit, never a silently wrong output
(:func:`kv_cache_overflow`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqmix.ops import _checks
from seqmix.ops import masks as masks_lib

Array = Any


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


def kv_cache_overflow(cache: KVCache, mask: masks_lib.Mask | None, new_tokens: int):
    """None if appending ``new_tokens`` can never lose a key ``mask`` allows; otherwise a bool scalar
    (True: it does), after raising ValueError if that is already known (a concrete ``next_pos``)."""
    recent, sinks = (None, 0) if mask is None else mask.cache_extent()
    if recent is not None and cache.ring >= recent and cache.n_sink >= sinks:
        return None  # a ring that serves the mask only overwrites keys it no longer allows
    overflow = cache.next_pos + new_tokens > cache.n_slots
    if _checks.is_concrete(overflow) and bool(overflow):
        need = "every past key" if recent is None else f"a ring of {recent} and {sinks} sink slots"
        raise ValueError(
            f"KV cache overflow: it holds {cache.next_pos} tokens in {cache.n_slots} slots (ring {cache.ring}, "
            f"{cache.n_sink} sinks) and {new_tokens} more would evict keys the mask still allows (it needs "
            f"{need}); size the cache with cache_size_for(mask, max_len)")
    return overflow


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
