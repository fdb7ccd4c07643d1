"""Decoding through KV caches equals the parallel op, token by token."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.ops import masks as M
from seqmix.testing import assert_close
from tests.ops.attention_cases import packed_segments, qkv

CASES = {
    "causal": M.Causal(),
    "window": M.LocalWindow(6),
    "streaming": M.streaming(5, 3),
    "chunked": M.ChunkedCausal(7),
}


def _decode_all(q, k, v, mask, seg=None, sink_logits=None, prefill=0):
    b, t, _, d = q.shape
    ring, n_sink = ops.cache_size_for(mask, t)
    cache = ops.init_kv_cache(b, k.shape[2], d, ring=ring, n_sink=n_sink)
    step = jax.jit(lambda q, k, v, c, s: ops.attention_decode(q, k, v, c, mask=mask,
                                                              segment_ids=s, sink_logits=sink_logits))
    outs = []
    if prefill:
        o, cache = ops.attention_decode(q[:, :prefill], k[:, :prefill], v[:, :prefill], cache, mask=mask,
                                        sink_logits=sink_logits,
                                        segment_ids=None if seg is None else seg[:, :prefill])
        outs.append(o)
    for i in range(prefill, t):
        o, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache,
                        None if seg is None else seg[:, i:i + 1])
        outs.append(o)
    return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("prefill", [0, 9])
def test_decode_equals_parallel(name, prefill):
    mask = CASES[name]
    q, k, v = qkv(0, 2, 23, 23, 4, 2, 8)
    sink = jnp.array([0.1, -0.5, 1.0, 0.0])
    ref = ops.attention(q, k, v, mask=mask, sink_logits=sink)
    out, cache = _decode_all(q, k, v, mask, sink_logits=sink, prefill=prefill)
    assert_close(out, ref, name=name)
    ring, n_sink = ops.cache_size_for(mask, 23)
    assert cache.n_slots == ring + n_sink


def test_packed_decode():
    q, k, v = qkv(1, 2, 20, 20, 2, 2, 8)
    seg = packed_segments(2, 20, [7, 1, 6])
    ref = ops.attention(q, k, v, mask=M.LocalWindow(4), segment_ids=seg)
    out, _ = _decode_all(q, k, v, M.LocalWindow(4), seg=seg)
    assert_close(out, ref)


def test_sliding_window_cache_is_small():
    ring, n_sink = ops.cache_size_for(M.streaming(64, 4), 100_000)
    assert (ring, n_sink) == (64, 4)
    assert ops.cache_size_for(M.Causal(), 500) == (500, 0)


def test_packed_decode_with_sinks_is_refused():
    q, k, v = qkv(1, 1, 4, 4, 2, 2, 8)
    cache = ops.init_kv_cache(1, 2, 8, ring=4, n_sink=2)
    with pytest.raises(NotImplementedError, match="sink"):
        ops.attention_decode(q, k, v, cache, segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_overflowing_a_cache_raises_and_is_nan_under_jit():
    """A full cache for a causal mask: the (n_slots + 1)-th token would evict a key the mask allows."""
    q, k, v = qkv(1, 1, 1, 1, 2, 2, 8)
    cache = ops.init_kv_cache(1, 2, 8, ring=3)
    for _ in range(3):
        _, cache = ops.attention_decode(q, k, v, cache, mask=M.Causal())
    with pytest.raises(ValueError, match="KV cache overflow.*cache_size_for"):
        ops.attention_decode(q, k, v, cache, mask=M.Causal())
    with pytest.raises(ValueError, match="KV cache overflow"):  # a two-token step that crosses the end
        ops.attention_decode(*qkv(1, 1, 2, 2, 2, 2, 8), ops.init_kv_cache(1, 2, 8, ring=3)._replace(
            next_pos=jnp.asarray(2, jnp.int32)), mask=M.Causal())
    o, _ = jax.jit(lambda c: ops.attention_decode(q, k, v, c, mask=M.Causal()))(cache)
    assert bool(jnp.isnan(o).all())


def test_a_ring_that_serves_the_mask_never_overflows():
    """A sliding-window ring (and sinks + window) overwrites only keys the mask no longer allows."""
    t = 12
    for mask in (M.LocalWindow(3), M.streaming(3, 2)):
        q, k, v = qkv(1, 1, t, t, 2, 2, 8)
        ring, n_sink = ops.cache_size_for(mask, 4)  # sized for a shorter stream than we decode
        cache = ops.init_kv_cache(1, 2, 8, ring=ring, n_sink=n_sink)
        step = jax.jit(lambda q, k, v, c, mask=mask: ops.attention_decode(q, k, v, c, mask=mask))
        outs = []
        for i in range(t):
            o, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache)
            outs.append(o)
        assert_close(jnp.concatenate(outs, 1), ops.attention(q, k, v, mask=mask))
