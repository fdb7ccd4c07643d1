"""Useful-FLOP formulas of the family records (docs/FAMILIES.md §7): every family has one, attention
counts exactly the allowed pairs of any mask, the chunked recurrent forms count their matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.ops import block_meta
from seqmix.ops import masks as M
from seqmix.ops.attention_call import prepare_attention


def _qkv(b=2, t=37, hq=4, hkv=2, d=16, dv=8):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, t, hkv, d)),
            jax.random.normal(ks[2], (b, t, hkv, dv)))


def test_every_family_record_has_a_flops_formula():
    assert all(fam.flops is not None for fam in ops.FAMILIES.values()), \
        [n for n, f in ops.FAMILIES.items() if f.flops is None]


@pytest.mark.parametrize("mask, pairs", [(M.Causal(), 37 * 38 // 2), (None, 37 * 37),
                                         (M.LocalWindow(5), 5 * 37 - 10)])
def test_attention_counts_allowed_pairs_in_closed_form(mask, pairs):
    q, k, v = _qkv()
    expected = 2 * 4 * (16 + 8) * 2 * pairs  # 2·Hq·(D + Dv) per pair, B = 2
    assert ops.useful_flops("attention", q, k, v, mask=mask) == expected
    assert ops.useful_flops("attention", q, k, v, mask=mask, backward=True) == expected * (1 + ops.BACKWARD_FLOPS)


def test_attention_count_matches_the_dense_mask_for_segments_and_odd_row_chunks():
    q, k, v = _qkv(t=29)
    seg = jnp.array([[0] * 10 + [1] * 19, [0] * 3 + [1] * 20 + [2] * 6])
    mask = M.streaming(6, 2) | M.PrefixLM(4)
    call = prepare_attention(q, k, v, mask=mask, segment_ids=seg)
    dense = block_meta.full_allowed(call.mask, call.q_pos, call.kv_pos, call.q_rel, call.kv_rel, call.q_seg,
                                    call.kv_seg)
    expected = int(np.broadcast_to(np.asarray(dense), (2, 29, 29)).sum())
    assert 0 < expected < 2 * 29 * 29
    assert block_meta.count_allowed(call, rows=4) == block_meta.count_allowed(call) == expected


def test_attention_count_refuses_traced_positions():
    q, k, v = _qkv(t=8)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda q: ops.useful_flops("attention", q, k, v, q_positions=jnp.arange(8)))(q)


def test_chunked_recurrent_formula():
    b, t, h, d, c = 2, 256, 3, 16, 64
    q = jnp.ones((b, t, h, d))
    g = jnp.zeros((b, t, h))
    per_chunk = 4 * c * d * d + 2 * (c * (c + 1) / 2) * 2 * d
    assert ops.useful_flops("simple_gla", q, q, q, g, chunk_size=c) == b * h * (t / c) * per_chunk
    retention = ops.useful_flops("retention", q, q, q, decay=ops.retnet_decay(h))
    assert retention == ops.useful_flops("simple_gla", q, q, q, g)
    # the delta rule's WY form does strictly more matmul work than a gated linear chunk
    beta = jnp.full((b, t, h), 0.5)
    assert ops.useful_flops("delta_rule", q, q, q, beta) > ops.useful_flops("simple_gla", q, q, q, g)
    # a feature map widens the key dimension the state is built on (Based's Taylor map: 1 + d + d(d+1)/2)
    assert ops.useful_flops("linear_attention", q, q, q, feature_map="taylor") > \
        ops.useful_flops("linear_attention", q, q, q)
