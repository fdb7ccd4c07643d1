"""Masks per kv head (``masks.PerHead``, ``masks.duo_attention``): the split-by-group op against one
materialized softmax over a per-head mask, forward and backward; decoding with a cache per group (full
for retrieval heads, a sinks + window ring for streaming heads); the layer and the ``duo:W:R`` mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import nn as snn
from seqmix import ops
from seqmix.models import LM, LMConfig
from seqmix.nn.attention import parse_duo_arg
from seqmix.ops import block_meta
from seqmix.ops import masks as M
from seqmix.ops.attention import masked_softmax_reference
from seqmix.ops.attention_call import prepare_attention
from seqmix.testing import assert_close
from tests.ops.attention_cases import packed_segments, qkv

PER_HEAD = M.PerHead((M.Causal(), M.streaming(5, 2), M.PowerAttention(3)), (1, 0, 2, 1))


def _dense_reference(q, k, v, masks, seg, sink):
    """One softmax over a ``[B, Hkv, 1, T, S]`` mask built head by head (no splitting)."""
    call = prepare_attention(q, k, v, segment_ids=seg, sink_logits=sink, return_lse=True)
    ok = [block_meta.full_allowed(masks.masks[i], call.q_pos, call.kv_pos, call.q_rel, call.kv_rel, call.q_seg,
                                  call.kv_seg) for i in masks.index]
    return masked_softmax_reference(call, jnp.stack(ok, 1)[:, :, None])


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("t, packed", [(37, False), (45, True)])
def test_per_head_matches_one_softmax_over_the_per_head_mask(impl, t, packed):
    q, k, v = qkv(3, 2, t, t, 8, 4, 8)
    seg = packed_segments(2, t, [17, 6]) if packed else None
    sink = jnp.linspace(-1.0, 1.0, 8)
    ct = tuple(jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(2, t, 8, 8), (2, 8, t)]))

    def vjp(f):
        out, pull = jax.vjp(jax.jit(f), q, k, v, sink)
        return out, pull(ct)

    (o, lse), g = vjp(lambda q, k, v, s: ops.attention_per_head(q, k, v, masks=PER_HEAD, sink_logits=s,
                                                                 segment_ids=seg, return_lse=True, impl=impl,
                                                                 block_q=16, block_kv=16))
    (o_ref, lse_ref), g_ref = vjp(lambda q, k, v, s: _dense_reference(q, k, v, PER_HEAD, seg, s))
    assert_close(o, o_ref, name="o")
    assert_close(lse, lse_ref, name="lse")
    for name, a, r in zip(("dq", "dk", "dv", "dsink"), g, g_ref):
        assert_close(a, r, role="gate" if name == "dsink" else "grad", name=name)


def test_duo_decode_keeps_the_full_cache_for_retrieval_heads_only():
    t, window, n_sink = 30, 6, 2
    masks = M.duo_attention([False, True, False], window=window, n_sink=n_sink)
    q, k, v = qkv(4, 2, t, t, 6, 3, 8)
    cache = ops.init_per_head_cache(2, masks, 8, max_len=t)
    retrieval, streaming = cache.caches  # groups in masks order: Causal first
    assert retrieval.k.shape == (2, t, 1, 8) and streaming.k.shape == (2, window + n_sink, 2, 8)
    step = jax.jit(lambda q, k, v, c: ops.attention_decode_per_head(q, k, v, c, masks=masks))
    o, cache = step(q[:, :7], k[:, :7], v[:, :7], cache)  # a prefill longer than the window, then steps
    outs = [o]
    for i in range(7, t):
        o, cache = step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache)
        outs.append(o)
    assert int(cache.next_pos) == t
    assert_close(jnp.concatenate(outs, 1), ops.attention_per_head(q, k, v, masks=masks, impl="reference"),
                 name="decode")


def test_layer_with_a_per_head_mask_and_the_duo_mixer_decode():
    masks = M.duo_attention([True, False], window=4, n_sink=1)
    layer = snn.Attention(32, 4, num_kv_heads=2, mask=masks, rope=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 20, 32))
    q, k, v = (p(x).reshape(2, 20, -1, 8) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    want = layer.o_proj(ops.attention_per_head(q, k, v, masks=masks, impl="reference").reshape(2, 20, 32))
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), want, name="layer")
    with pytest.raises(ValueError, match="names 2 kv heads"):
        snn.Attention(32, 4, num_kv_heads=4, mask=masks, rngs=nnx.Rngs(0))

    model = LM(LMConfig(vocab_size=17, d_model=32, num_heads=4, num_kv_heads=2, max_len=24, mixers="duo:3:1,attn"),
               rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 17)
    ref = nnx.jit(lambda m, x: m(x))(model, tokens)
    caches = model.init_cache(2, 16)
    decode = nnx.jit(lambda m, x, c: m.decode(x, c))
    logits, caches = decode(model, tokens[:, :5], caches)
    outs = [logits]
    for i in range(5, 16):
        logits, caches = decode(model, tokens[:, i:i + 1], caches)
        outs.append(logits)
    assert_close(jnp.concatenate(outs, 1), ref, name="duo mixer prefill + steps")


@pytest.mark.parametrize("build", [
    lambda: M.PerHead((), (0,)), lambda: M.PerHead((M.Causal(),), (1,)), lambda: M.PerHead((M.Causal(),), ()),
    lambda: M.PerHead(("causal",), (0,)), lambda: M.duo_attention([1, 0], window=4),
    lambda: M.duo_attention([], window=4), lambda: M.duo_attention([True], window=0)])
def test_bad_per_head_masks(build):
    with pytest.raises(ValueError):
        build()


def test_per_head_errors_and_mixer_arguments():
    q, k, v = qkv(0, 1, 8, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="names 3 kv heads"):
        ops.attention_per_head(q, k, v, masks=M.PerHead((M.Causal(),), (0, 0, 0)))
    with pytest.raises(ValueError, match="PerHead"):
        ops.attention_per_head(q, k, v, masks=M.Causal())
    assert parse_duo_arg("64:2") == (64, 2)
    for bad in (None, "64", "0:1", "x:1", "4:1:1"):
        with pytest.raises(ValueError, match="duo:W:R"):
            parse_duo_arg(bad)
    with pytest.raises(ValueError, match="retrieval heads"):
        LM(LMConfig(vocab_size=17, d_model=32, num_heads=4, num_kv_heads=2, mixers="duo:4:3"), rngs=nnx.Rngs(0))
