"""Block metadata is sound: EMPTY blocks hold no allowed pair and FULL blocks hold only allowed pairs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.ops import block_meta
from seqmix.ops import masks as M
from tests.ops.attention_cases import MASKS, packed_segments


def _classes_and_dense(mask, t, s, bq, bk, seg=None, q_pos=None, kv_pos=None):
    q_pos = jnp.arange(s - t, s, dtype=jnp.int32) if q_pos is None else q_pos
    kv_pos = jnp.arange(s, dtype=jnp.int32) if kv_pos is None else kv_pos
    q_rel = M.segment_relative(q_pos, seg)
    kv_rel = M.segment_relative(kv_pos, seg)
    dense = np.asarray(block_meta.full_allowed(mask, q_pos, kv_pos, q_rel, kv_rel, seg, seg))
    cls = np.asarray(block_meta.classify_blocks(mask, q_pos, kv_pos, jnp.broadcast_to(q_rel, (dense.shape[0], t)),
                                       jnp.broadcast_to(kv_rel, (dense.shape[0], s)), seg, seg,
                                       jnp.ones((t,), bool), bq, bk))
    return cls, dense


def _assert_sound(cls, dense, bq, bk):
    for i in range(cls.shape[0]):
        for j in range(cls.shape[1]):
            blk = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            if cls[i, j] == M.EMPTY:
                assert not blk.any(), (i, j)
            if cls[i, j] == M.FULL:
                assert blk.all(), (i, j)
            if cls[i, j] == M.PARTIAL:  # tight for these masks: partial really is mixed or batch-mixed
                assert blk.any() and not blk.all(), (i, j)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_block_classes_are_sound_and_tight(name):
    t, bq, bk = 96, 16, 32
    cls, dense = _classes_and_dense(MASKS[name](t, t), t, t, bq, bk)
    if name == "explicit":  # random matrix: only soundness, partial blocks may be all-true by chance
        for i in range(cls.shape[0]):
            for j in range(cls.shape[1]):
                blk = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert cls[i, j] != M.EMPTY or not blk.any()
                assert cls[i, j] != M.FULL or blk.all()
        return
    _assert_sound(cls, dense, bq, bk)
    if name == "causal":
        assert (cls == M.EMPTY).sum() == 6 and (cls == M.FULL).sum() == 6


def test_segments_make_blocks_empty():
    seg = packed_segments(1, 64, [32])
    cls, dense = _classes_and_dense(M.Full(), 64, 64, 16, 16, seg=seg)
    _assert_sound(cls, dense, 16, 16)
    assert cls[0, 3] == M.EMPTY and cls[3, 0] == M.EMPTY and cls[0, 0] == M.FULL


_ATOMS = st.sampled_from([
    M.Causal(), M.Full(), M.LocalWindow(5), M.SlidingWindow(2, 7), M.ChunkedCausal(12), M.Sinks(3),
    M.PrefixLM(9), M.SlidingWindow(None, 4), M.PowerAttention(3), M.PowerAttention(1, 3, 0),
])
_MASKS = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.builds(lambda a, b: a & b, inner, inner), st.builds(lambda a, b: a | b, inner, inner)), max_leaves=4)


@settings(max_examples=12, deadline=None)
@given(mask=_MASKS, t=st.integers(8, 60), bq=st.sampled_from([8, 16]), bk=st.sampled_from([8, 24]),
       cut=st.integers(0, 60), shuffled=st.booleans())
def test_composed_masks_sound_on_any_positions(mask, t, bq, bk, cut, shuffled):
    """Soundness for composed masks, packed segments and permuted (e.g. zigzag) positions."""
    tp, sp = -(-t // bq) * bq, -(-t // bk) * bk
    n = max(tp, sp)
    pos = np.arange(n, dtype=np.int32)
    if shuffled:
        pos = np.random.default_rng(t).permutation(pos).astype(np.int32)
    seg = jnp.asarray((np.arange(n) >= min(cut, n - 1)).astype(np.int32)[None])
    q_pos, kv_pos = jnp.asarray(pos[:tp]), jnp.asarray(pos[:sp])
    q_rel, kv_rel = M.segment_relative(q_pos, seg[:, :tp]), M.segment_relative(kv_pos, seg[:, :sp])
    # jitted: one program per example instead of one compile per primitive (most of the test's time)
    dense = np.asarray(jax.jit(functools.partial(block_meta.full_allowed, mask))(
        q_pos, kv_pos, q_rel, kv_rel, seg[:, :tp], seg[:, :sp]))
    cls = np.asarray(jax.jit(functools.partial(block_meta.classify_blocks, mask, block_q=bq, block_kv=bk))(
        q_pos, kv_pos, q_rel, kv_rel, seg[:, :tp], seg[:, :sp], jnp.ones((tp,), bool)))
    for i in range(cls.shape[0]):
        for j in range(cls.shape[1]):
            blk = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            assert cls[i, j] != M.EMPTY or not blk.any(), (i, j, mask)
            assert cls[i, j] != M.FULL or blk.all(), (i, j, mask)


def test_cache_extent():
    assert M.Causal().cache_extent() == (None, 0)
    assert M.LocalWindow(8).cache_extent() == (8, 0)
    assert M.streaming(8, 4).cache_extent() == (8, 4)
    assert M.ChunkedCausal(16).cache_extent() == (16, 0)
    assert (M.Causal() & M.LocalWindow(5)).cache_extent() == (5, 0)
    assert M.PrefixLM(4).cache_extent() == (None, 0)


def test_segment_relative():
    seg = jnp.array([[0, 0, 1, 1, 1, 2]])
    rel = M.segment_relative(jnp.arange(6, dtype=jnp.int32), seg)
    assert rel.tolist() == [[0, 1, 0, 1, 2, 0]]


def test_explicit_mask_must_cover_the_call():
    from seqmix import ops

    x = jnp.ones((1, 8, 2, 8))
    for shape in [(6, 8), (8, 6), (8, 7)]:
        with pytest.raises(ValueError, match="Explicit mask of shape .* does not cover this call"):
            ops.attention(x, x, x, mask=M.Explicit(np.ones(shape, bool)))
    with pytest.raises(ValueError, match=r"needs at least \[8, 8\]"):  # Tq < S: queries sit at S - Tq .. S - 1
        ops.attention(x[:, :4], x, x, mask=M.Explicit(np.ones((4, 8), bool)) & M.Causal())
    big = np.tril(np.ones((12, 12), bool))  # a larger table is indexed by position: its top-left part
    assert jnp.allclose(ops.attention(x, x, x, mask=M.Explicit(big)), ops.attention(x, x, x, mask=M.Causal()))
