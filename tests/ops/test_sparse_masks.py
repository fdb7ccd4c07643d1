"""Static sparse patterns (``seqmix.ops.sparse_masks``): hand-worked PowerAttention masks, packed
documents, its O(log n) keys per query, decoding, and bad arguments. Block-metadata soundness and the
implementations' agreement run with every other mask (``tests/ops/attention_cases.MASKS``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.ops import block_meta
from seqmix.ops import masks as M
from seqmix.testing import assert_close
from tests.ops.attention_cases import packed_segments, qkv


def _dense(mask, t, seg=None):
    pos = jnp.arange(t, dtype=jnp.int32)
    rel = M.segment_relative(pos, seg)
    return np.asarray(block_meta.full_allowed(mask, pos, pos, rel, rel, seg, seg))[0]


def test_token_level_pattern_is_self_and_power_of_two_distances():
    got = _dense(M.PowerAttention(1, window_blocks=1, sink_blocks=0), 20)
    i, j = np.arange(20)[:, None], np.arange(20)[None]
    d = i - j
    want = (d == 0) | np.isin(d, [1, 2, 4, 8, 16])
    np.testing.assert_array_equal(got, want)


def test_block_pattern_by_hand():
    """Blocks of 2, own block causal, the block before it (distance 1), distances 2 and 4, block 0."""
    got = _dense(M.PowerAttention(2), 14)
    blocks = np.zeros((7, 7), bool)
    for qb in range(7):
        for kb in range(qb + 1):
            blocks[qb, kb] = (qb - kb) in (0, 1, 2, 4) or kb == 0
    assert not blocks[6, 3] and not blocks[6, 1] and blocks[6, 2] and blocks[5, 0] and not blocks[5, 2]
    want = np.kron(blocks, np.ones((2, 2), bool)) & np.tril(np.ones((14, 14), bool))
    np.testing.assert_array_equal(got, want)
    wide = _dense(M.PowerAttention(2, window_blocks=3, sink_blocks=0), 14)
    d = np.arange(14)[:, None] // 2 - np.arange(14)[None] // 2
    np.testing.assert_array_equal(wide, np.tril(np.ones((14, 14), bool)) & ((d < 3) | np.isin(d, [4])))


def test_packed_documents_see_the_pattern_they_see_alone():
    lengths = (9, 23)
    seg = packed_segments(1, 32, lengths)
    mask = M.PowerAttention(3, window_blocks=2)
    packed = _dense(mask, 32, seg)
    np.testing.assert_array_equal(packed[9:, 9:], _dense(mask, 23))
    np.testing.assert_array_equal(packed[:9, :9], _dense(mask, 9))
    assert not packed[9:, :9].any()


def test_keys_per_query_grow_logarithmically():
    t = 1024
    counts = _dense(M.PowerAttention(1, sink_blocks=0), t).sum(-1)
    assert counts.max() == int(np.log2(t - 1)) + 2  # itself + distances 1, 2, ..., 512


def test_decode_equals_the_parallel_form():
    t = 21
    q, k, v = qkv(2, 1, t, t, 2, 1, 8)
    mask = M.PowerAttention(3)
    ring, n_sink = ops.cache_size_for(mask, t)
    assert ring >= t  # the pattern reaches arbitrarily far back: a full cache
    cache = ops.init_kv_cache(1, 1, 8, ring=ring, n_sink=n_sink)
    step = jax.jit(lambda q, k, v, c: ops.attention_decode(q, k, v, c, mask=mask))
    outs = []
    for i in range(t):
        o, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache)
        outs.append(o)
    assert_close(jnp.concatenate(outs, 1), ops.attention(q, k, v, mask=mask, impl="reference"), name="decode")


@pytest.mark.parametrize("kwargs", [dict(block_size=0), dict(block_size=2.0), dict(block_size=4, window_blocks=0),
                                    dict(block_size=4, sink_blocks=-1), dict(block_size=True)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="PowerAttention"):
        M.PowerAttention(**kwargs)
