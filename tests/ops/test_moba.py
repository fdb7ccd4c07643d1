"""MoBA: the gate against a brute-force numpy selection, the special cases (topk ≥ #blocks is causal
attention, topk = 1 is chunked causal), ties, packed documents, the xla form against the reference forward
and backward at tiles that do not divide the blocks, decoding, errors, the layer and the mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import nn as snn
from seqmix import ops
from seqmix.models import LM, LMConfig
from seqmix.nn.moba import parse_moba_arg
from seqmix.ops import masks as M
from seqmix.ops.moba import prepare_moba, top_blocks
from seqmix.testing import assert_close, assert_trees_close
from tests.models.test_lm import _decode, _forward

jax.config.update("jax_default_matmul_precision", "highest")

# one compiled program per configuration (eager ops would compile one by one)
moba = jax.jit(ops.moba, static_argnames=("block_size", "topk", "impl", "block_q", "block_kv", "return_lse",
                                          "q_offset"))


def _inputs(b=2, t=100, h=4, hkv=2, d=16, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (b, t, n, d), jnp.float32).astype(dtype)
                 for kk, n in zip(ks, (h, hkv, hkv)))


def _brute_force(q, k, v, bs, topk, seg=None):
    """MoBA by loops in numpy float64: per query and head, the block means of its document, the
    ranking, the selected keys, the softmax."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    seg = np.zeros((b, t), int) if seg is None else np.asarray(seg)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for bi in range(b):
        start = np.array([0] + [j for j in range(1, t) if seg[bi, j] != seg[bi, j - 1]])
        first = start[np.searchsorted(start, np.arange(t), side="right") - 1]
        for hi in range(h):
            kk, vv = k[bi, :, hi // g], v[bi, :, hi // g]
            for i in range(t):
                own = (i - first[i]) // bs
                means = [kk[first[i] + c * bs:first[i] + (c + 1) * bs].mean(0) for c in range(own)]
                scores = [q[bi, i, hi] @ m for m in means]
                ranked = sorted(range(own), key=lambda c: (-scores[c], c))[:topk - 1]
                keys = [j for c in ranked for j in range(first[i] + c * bs, first[i] + (c + 1) * bs)]
                keys += list(range(first[i] + own * bs, i + 1))
                s = np.array([q[bi, i, hi] @ kk[j] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ vv[keys]
    return out


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("bs, topk, packed", [(8, 3, False), (7, 2, True), (16, 4, True)])
def test_matches_brute_force(impl, bs, topk, packed):
    q, k, v = _inputs(b=2, t=45, h=2, hkv=1, d=8, seed=bs)
    seg = np.array([[0] * 20 + [1] * 25, [3] * 9 + [4] * 36]) if packed else None
    got = moba(q, k, v, block_size=bs, topk=topk, segment_ids=None if seg is None else jnp.asarray(seg),
                   impl=impl, block_q=8, block_kv=16)
    np.testing.assert_allclose(np.asarray(got), _brute_force(q, k, v, bs, topk, seg), atol=2e-5)


def test_gate_ties_go_to_the_lower_block_and_fewer_blocks_take_all():
    scores = jnp.array([[3.0, 5.0, 5.0, 1.0, 5.0]])
    chosen = lambda n_past, topk: top_blocks(scores, jnp.array([n_past]), topk)[0]  # noqa: E731
    np.testing.assert_array_equal(chosen(5, 3), [[1, 2]])
    np.testing.assert_array_equal(chosen(1, 3), [[0, -1]])
    np.testing.assert_array_equal(chosen(0, 3), [[-1, -1]])
    assert chosen(5, 1).shape == (1, 0)
    # equal keys everywhere: every past block ties; the lowest ones are chosen, by every implementation
    q, _, v = _inputs(b=1, t=64, h=2, hkv=1, d=8)
    k = jnp.ones((1, 64, 1, 8))
    ref = moba(q, k, v, block_size=8, topk=3, impl="reference")
    i, j = np.arange(64)[:, None], np.arange(64)[None]
    first_blocks = np.where(i // 8 == j // 8, j <= i, (j < 16) & (j // 8 < i // 8))  # own block + blocks 0, 1
    want = ops.attention(q, k, v, mask=M.Explicit(first_blocks), impl="reference")
    assert_close(ref, want, name="ties")
    assert_close(moba(q, k, v, block_size=8, topk=3, impl="xla", block_q=16, block_kv=8), want, name="xla ties")


def test_nan_gate_score_makes_the_row_nan():
    scores = jnp.array([[3.0, jnp.nan, 5.0], [3.0, 4.0, jnp.nan]])
    chosen, unrankable = top_blocks(scores, jnp.array([3, 2]), 2)
    np.testing.assert_array_equal(unrankable, [True, False])  # row 2's NaN candidate is not a past block
    np.testing.assert_array_equal(chosen[1], [1])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_nan_key_poisons_the_queries_whose_gate_ranks_its_block(impl):
    """A NaN key in block 1 makes that block's mean NaN: every later query that ranks block 1 gets NaN,
    whether or not it would have chosen it; queries before it and in block 1 stay as in the clean run."""
    q, k, v = _inputs(b=1, t=40, h=2, hkv=1, d=8)
    bad = k.at[0, 9, 0, 3].set(jnp.nan)  # block 1 = positions 8..15
    kw = dict(block_size=8, topk=2, impl=impl, block_q=8, block_kv=8)
    clean, out = np.asarray(moba(q, k, v, **kw)), np.asarray(moba(q, bad, v, **kw))
    assert np.isnan(out[0, 16:]).all()
    np.testing.assert_array_equal(np.isnan(out[0, :16]).any(-1).any(-1), np.arange(16) >= 9)  # attend key 9
    np.testing.assert_allclose(out[0, :9], clean[0, :9], atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_topk_covering_all_blocks_is_causal_attention(impl):
    q, k, v = _inputs(t=100)
    assert_close(moba(q, k, v, block_size=16, topk=7, impl=impl), ops.attention(q, k, v, mask=M.Causal()))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_topk_1_is_chunked_causal_never_full(impl):
    q, k, v = _inputs(t=100)
    got = moba(q, k, v, block_size=16, topk=1, impl=impl)
    assert_close(got, ops.attention(q, k, v, mask=M.ChunkedCausal(16)))


@pytest.mark.parametrize("t, bs, topk, bq, bk", [(100, 12, 3, 16, 8), (64, 16, 2, 32, 16), (37, 5, 4, 8, 8),
                                                  (130, 32, 2, 24, 40)])
def test_xla_matches_reference_forward_and_backward(t, bs, topk, bq, bk):
    q, k, v = _inputs(t=t, seed=t)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [t // 3, t // 2, t - t // 3 - t // 2], axis=1).repeat(2, 0))
    w = jax.random.normal(jax.random.PRNGKey(9), (2, 4, t))

    def loss(impl, q, k, v):
        o, lse = moba(q, k, v, block_size=bs, topk=topk, segment_ids=seg, return_lse=True, impl=impl,
                          block_q=bq, block_kv=bk)
        return (o ** 2).sum() + (w * lse).sum(), (o, lse)

    (_, ref), g_ref = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, got), g = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_trees_close(got, ref, name="outputs")
    assert_trees_close(g, g_ref, role="grad", name="gradients")


def test_bf16_and_gqa_1():
    q, k, v = _inputs(t=80, h=4, hkv=1, dtype=jnp.bfloat16)
    got = moba(q, k, v, block_size=16, topk=2, impl="xla")
    assert got.dtype == jnp.bfloat16
    assert_close(got, moba(q, k, v, block_size=16, topk=2, impl="reference"), kind="softmax_bf16")


def test_queries_at_an_offset_see_the_whole_key_prefix():
    q, k, v = _inputs(t=96)
    full = moba(q, k, v, block_size=16, topk=3, impl="reference")
    for impl in ("reference", "xla"):
        part = moba(q[:, 40:72], k[:, :72], v[:, :72], block_size=16, topk=3, q_offset=40, impl=impl)
        assert_close(part, full[:, 40:72], name=impl)


def test_decode_matches_the_parallel_form():
    q, k, v = _inputs(b=2, t=50)
    want = moba(q, k, v, block_size=8, topk=3, impl="reference")
    cache = ops.init_moba_cache(2, 2, 16, max_len=50, block_size=8)
    step = jax.jit(lambda q, k, v, c: ops.moba_decode(q, k, v, c, topk=3))
    o, cache = step(q[:, :13], k[:, :13], v[:, :13], cache)  # a prompt ending inside a block
    outs = [o]
    for i in range(13, 50):
        o, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache)
        outs.append(o)
    assert_close(jnp.concatenate(outs, 1), want, name="prefill + steps")
    with pytest.raises(ValueError, match="KV cache overflow"):
        ops.moba_decode(q[:, :1], k[:, :1], v[:, :1], cache, topk=3)


def test_flops_count_the_attended_pairs():
    q, k, v = _inputs(b=1, t=40, h=2, hkv=1, d=8)
    call = prepare_moba(q, k, v, block_size=8, topk=2)
    # query i: (i mod 8) + 1 own keys, plus 8 keys of one past block from block 1 on
    pairs = sum(i % 8 + 1 + (8 if i >= 8 else 0) for i in range(40))
    assert ops.useful_flops("moba", q, k, v, block_size=8, topk=2) == 2 * 2 * 16 * pairs
    assert ops.get_family("moba").flops(call) == 2 * 2 * 16 * pairs


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0, topk=2), "block_size must be an int >= 1"),
    (dict(block_size=8, topk=0), "topk must be an int >= 1"),
    (dict(block_size=8, topk=True), "topk must be an int >= 1"),
    (dict(block_size=8, topk=2, q_offset=70), r"q_offset must lie in \[0, S - Tq\] = \[0, 0\]"),
    (dict(block_size=8, topk=2, segment_ids=jnp.array([[0] * 20 + [1] * 20 + [0] * 24] * 2)), "one contiguous run"),
])
def test_errors(kwargs, match):
    q, k, v = _inputs(t=64)
    with pytest.raises(ValueError, match=match):
        ops.moba(q, k, v, **kwargs)


def test_more_queries_than_keys_is_an_error():
    q, k, v = _inputs(t=64)
    with pytest.raises(ValueError, match="must not outnumber keys"):
        ops.moba(q, k[:, :32], v[:, :32], block_size=8, topk=2)


# ----------------------------------------------------------------------------- layer and mixer


def test_layer_is_the_op_on_its_projections_and_switches_to_full():
    layer = snn.MoBAAttention(32, 4, num_kv_heads=2, block_size=8, topk=2, rope=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 40, 32))
    q, k, v = (p(x).reshape(2, 40, -1, 8) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    o = moba(q, k, v, block_size=8, topk=2, impl="reference")
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), layer.o_proj(o.reshape(2, 40, 32)), name="moba layer")
    full = snn.MoBAAttention(32, 4, num_kv_heads=2, block_size=8, topk=2, rope=False, full_attention=True,
                             rngs=nnx.Rngs(0))
    o = ops.attention(q, k, v, mask=M.Causal())
    assert_close(nnx.jit(lambda m, x: m(x))(full, x), full.o_proj(o.reshape(2, 40, 32)), name="full attention")
    with pytest.raises(ValueError, match="mask is not an option"):
        snn.MoBAAttention(32, 4, block_size=8, topk=2, mask=M.Causal(), rngs=nnx.Rngs(0))


def test_layer_sequence_parallel_settings_it_cannot_run_fail_when_built():
    """(The parallel layer itself is checked against the single-device LM in tests/parallel.)"""
    from seqmix.parallel import SequenceParallel, make_mesh

    mesh = make_mesh({"seq": 1}, devices=jax.devices()[:1])
    build = lambda sp, **kw: snn.MoBAAttention(32, 4, block_size=8, topk=2, sequence_parallel=sp,  # noqa: E731
                                               rngs=nnx.Rngs(0), **kw)
    with pytest.raises(ValueError, match=r"moba layers run by strategies \['allgather'\]"):
        build(SequenceParallel(mesh, strategy="ring"))
    with pytest.raises(ValueError, match="contiguous layout"):
        build(SequenceParallel(mesh, layout="zigzag"))
    build(SequenceParallel(mesh, strategy="ring"), full_attention=True)  # plain attention runs any strategy
    x = jax.random.normal(jax.random.key(1), (1, 12, 32))
    layer, plain = build(SequenceParallel(mesh)), build(None)
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), nnx.jit(lambda m, x: m(x))(plain, x), name="1-shard SP")


@pytest.mark.parametrize("arg, want", [("64:3", (64, 3)), ("8:1", (8, 1))])
def test_mixer_argument(arg, want):
    assert parse_moba_arg(arg) == want


@pytest.mark.parametrize("bad", [None, "64", "0:3", "64:0", "64:x", "8:2:1"])
def test_mixer_bad_argument(bad):
    with pytest.raises(ValueError, match="moba:B:K"):
        parse_moba_arg(bad)


def test_mixer_decode_and_packed_documents():
    model = LM(LMConfig(vocab_size=17, d_model=32, num_heads=4, max_len=32, mixers="moba:4:2,attn"),
               rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(3), (2, 14), 0, 17)
    ref = _forward(model, tokens)
    caches = model.init_cache(2, 14)
    first, caches = _decode(model, tokens[:, :6], caches)
    rest = []
    for i in range(6, 14):
        logits, caches = _decode(model, tokens[:, i:i + 1], caches)
        rest.append(logits)
    assert_close(jnp.concatenate([first] + rest, 1), ref, name="prefill + steps")
    lengths = (9, 1, 6)
    docs = [jax.random.randint(jax.random.key(10 + i), (1, n), 0, 17) for i, n in enumerate(lengths)]
    seg = jnp.concatenate([jnp.full((1, n), i, jnp.int32) for i, n in enumerate(lengths)], 1)
    positions = jnp.concatenate([jnp.arange(n, dtype=jnp.int32) for n in lengths])
    got = _forward(model, jnp.concatenate(docs, 1), positions, seg)
    assert_close(got, jnp.concatenate([_forward(model, d) for d in docs], 1), name="packed vs separate")
