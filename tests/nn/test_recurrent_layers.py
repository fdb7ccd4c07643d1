"""seqmix.nn recurrent layers: ShortConv, feature maps, LinearAttention / Hedgehog, Retention, GLA, SimpleGLA,
DeltaNet, GatedDeltaNet, Based; their mixers in an LM.

Each layer: forward shapes and dtypes (fp32, bf16), decoding token by token and prefill + decode equal the
parallel form, packed segments equal per-document calls (short convs reset too), bad arguments raise.
Every numerics check runs under one jit per layer (compilation dominates the cost on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from seqmix.models import LM, LMConfig, registered_mixers
from seqmix.nn.feature_maps import HedgehogFeatureMap, attention_distillation_loss, feature_map
from seqmix.nn import (Based, BasedCache, DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention,
                              Retention, SimpleGLA, hedgehog_distillation_loss)
from seqmix.nn.recurrent_cache import RecurrentCache
from seqmix.nn.short_conv import ConvCache, ShortConv, causal_conv
from seqmix.ops import get_family
from seqmix.testing import assert_close, assert_not_close, errors
from seqmix.train.tasks import mqar

B, T, D, H = 2, 9, 16, 2
CHUNK = 4  # several chunks per sequence, chunk edges inside documents

# Every layer class runs with a short conv on q, k, v at least once (width 2..4), and without one.
LAYERS = {
    "linear_elu": lambda **kw: LinearAttention(D, H, feature_map="elu", chunk_size=CHUNK, **kw),
    "linear_identity_conv2": lambda **kw: LinearAttention(D, H, feature_map="identity", short_conv=2,
                                                          chunk_size=CHUNK, **kw),
    "linear_taylor": lambda **kw: LinearAttention(D, H, feature_map="taylor", key_dim=4, chunk_size=CHUNK, **kw),
    "hedgehog_conv": lambda **kw: LinearAttention(D, H, feature_map="hedgehog", short_conv=4, chunk_size=CHUNK, **kw),
    "retnet_conv": lambda **kw: Retention(D, H, short_conv=4, chunk_size=CHUNK, **kw),
    "gla_conv": lambda **kw: GatedLinearAttention(D, H, gate_low_rank=4, short_conv=4, chunk_size=CHUNK, **kw),
    "simple_gla_conv3": lambda **kw: SimpleGLA(D, H, short_conv=3, chunk_size=CHUNK, **kw),
    "deltanet": lambda **kw: DeltaNet(D, H, chunk_size=CHUNK, **kw),
    "deltanet_no_conv": lambda **kw: DeltaNet(D, H, short_conv=None, chunk_size=CHUNK, **kw),
    "gdn_neg_eigval": lambda **kw: GatedDeltaNet(D, H, allow_neg_eigval=True, chunk_size=CHUNK, **kw),
    "based": lambda **kw: Based(D, H, feature_dim=4, window=3, chunk_size=CHUNK, **kw),
}

# documents [0:4], [4:5], [5:9] in both rows (compared with one call per document) ...
SEG_A = jnp.array([[0, 0, 0, 0, 1, 2, 2, 2, 2]] * 2, jnp.int32)
# ... and per-row layouts for decoding (row 1 has a new segment exactly at the prefill split, t = 5)
SEG_B = jnp.array([[0, 0, 0, 0, 1, 2, 2, 2, 2], [3, 3, 4, 4, 4, 7, 7, 8, 8]], jnp.int32)
SPLIT = 5


def _x(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _scan_decode(m, cache, x, seg=None):
    """Decode ``x [B, T, d]`` one token at a time (lax.scan); returns ``(y [B, T, d], cache)``."""
    seg_t = jnp.zeros(x.shape[:2], jnp.int32) if seg is None else seg

    def body(c, inp):
        xt, st = inp
        y, c = m.decode(xt[:, None], c, segment_ids=None if seg is None else st[:, None])
        return c, y[:, 0]

    cache, ys = jax.lax.scan(body, cache, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(seg_t, 1, 0)))
    return jnp.moveaxis(ys, 0, 1), cache


@nnx.jit
def _all_forms(m, x):
    """Every form of the layer on ``x`` [B, T, d] in one compilation (batched where shapes allow)."""
    out = {"full": m(x)}
    packed = m(jnp.concatenate([x, x]), segment_ids=jnp.concatenate([SEG_A, SEG_B]))
    out["packed_a"], out["packed_b"] = packed[:B], packed[B:]
    ends = m(jnp.concatenate([x[:, :4], x[:, 5:]]))  # documents 0 and 2 (both of length 4) in one call
    out["docs"] = jnp.concatenate([ends[:B], m(x[:, 4:5]), ends[B:]], axis=1)
    # prefill (the op with initial_state) then single steps (the family's *_step)
    y1, c = m.decode(x[:, :SPLIT], m.init_cache(B, T))
    y2, c = _scan_decode(m, c, x[:, SPLIT:])
    out["prefill"] = jnp.concatenate([y1, y2], axis=1)
    # packed decoding: token by token, and two multi-token calls split at a segment start (row 1)
    out["tokens_seg"], _ = _scan_decode(m, m.init_cache(B, T), x, SEG_B)
    y1, c = m.decode(x[:, :SPLIT], m.init_cache(B, T), segment_ids=SEG_B[:, :SPLIT])
    y2, _ = m.decode(x[:, SPLIT:], c, segment_ids=SEG_B[:, SPLIT:])
    out["prefill_seg"] = jnp.concatenate([y1, y2], axis=1)
    return out


@nnx.jit
def _forward(m, x, positions=None, segment_ids=None):
    return m(x, positions=positions, segment_ids=segment_ids)


# ----------------------------------------------------------------------------- ShortConv


def _conv_reference(x, w, seg):
    """numpy loop: y_t = Σ_j w_j x_{t-j}, taps stopping at the first segment change."""
    x, w, seg = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(seg)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(w.shape[0]):
                s = t - j
                if s < 0 or any(seg[b, u] != seg[b, u - 1] for u in range(s + 1, t + 1)):
                    break
                y[b, t] += w[j] * x[b, s]
    return y


@nnx.jit
def _conv_forms(conv, x, seg):
    out = {"plain": conv(x), "packed": conv(x, segment_ids=seg)}
    out["docs"] = jnp.concatenate([conv(x[:1, :3]), conv(x[:1, 3:5]), conv(x[:1, 5:])], axis=1)
    cache, ys = conv.init_cache(2), []
    for a, b in ((0, 1), (1, 3), (3, 4), (4, 8), (8, 9)):  # segment changes at piece boundaries too
        y, cache = conv.decode(x[:, a:b], cache, segment_ids=seg[:, a:b])
        ys.append(y)
    out["decode"] = jnp.concatenate(ys, axis=1)
    return out, cache


def test_short_conv_values_resets_and_decode():
    conv = ShortConv(3, 4, activation=None, rngs=nnx.Rngs(0))
    assert conv.weight.shape == (4, 3)
    x = _x((2, 9, 3))
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)  # ids may recur
    w = conv.weight[...]
    out, cache = _conv_forms(conv, x, seg)
    assert_close(out["plain"], _conv_reference(x, w, np.zeros((2, 9), int)), name="no segments")
    assert_close(out["packed"], _conv_reference(x, w, seg), name="segments")
    assert_close(out["docs"], out["packed"][:1], name="packed vs per document")
    assert_close(out["decode"], out["packed"], name="decode in pieces")
    assert isinstance(cache, ConvCache) and cache.x.shape == (2, 3, 3) and cache.seg.tolist() == [[2] * 3, [0] * 3]
    # SiLU, bias, width 1, bf16
    conv2 = ShortConv(3, 1, use_bias=True, rngs=nnx.Rngs(1))
    assert_close(conv2(x), jax.nn.silu(x * conv2.weight[0]), name="width 1")
    assert conv(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert causal_conv(x, w).dtype == jnp.float32
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConv(3, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        ShortConv(3, 4, activation="gelu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, seq, 3\]"):
        conv(x[..., :2])
    with pytest.raises(ValueError, match="ConvCache"):
        conv.decode(x, (cache.x, cache.seg))


# ----------------------------------------------------------------------------- feature maps, Hedgehog


def test_feature_maps():
    x = _x((2, 5, H, 4))
    hh = HedgehogFeatureMap(H, 4)
    phi = hh(x)
    assert phi.shape == (2, 5, H, 8)
    assert bool(jnp.all(phi > 0))
    assert_close(jnp.sum(phi, -1), jnp.ones((2, 5, H)), name="sums to 1")
    ref = jax.nn.softmax(jnp.concatenate([2 * x, -2 * x], -1), -1)  # identity init
    assert_close(phi, ref, name="identity init")
    big = hh(1e4 * x)  # the stable form never overflows
    assert bool(jnp.all(jnp.isfinite(big)))
    assert hh(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert_close(feature_map("elu")(x), jax.nn.elu(x) + 1)
    assert feature_map("taylor")(x).shape == (2, 5, H, 1 + 4 + 10)
    with pytest.raises(ValueError, match="feature_map"):
        feature_map("hedgehog")
    with pytest.raises(ValueError, match="HedgehogFeatureMap"):
        hh(x[..., :3])


def test_hedgehog_distillation_loss_decreases():
    layer = LinearAttention(D, H, feature_map="hedgehog", rngs=nnx.Rngs(0))
    x = _x((2, 12, D), 3)
    is_map = lambda path, v: path[0] in ("q_map", "k_map")  # noqa: E731
    graphdef, maps, rest = nnx.split(layer, nnx.All(nnx.Param, is_map), ...)
    tx = optax.adam(5e-2)
    opt_state = tx.init(maps)

    @jax.jit
    def step(maps, opt_state):
        loss, grads = jax.value_and_grad(lambda p: hedgehog_distillation_loss(nnx.merge(graphdef, p, rest), x))(maps)
        updates, opt_state = tx.update(grads, opt_state, maps)
        return optax.apply_updates(maps, updates), opt_state, loss

    losses = []
    for _ in range(6):
        maps, opt_state, loss = step(maps, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1e-3, losses
    # a constant student spreads each row uniformly over its causal prefix: loss = mean_i log(i + 1),
    # whatever the teacher (a cross-entropy against weights that sum to 1)
    q, k = _x((1, 6, 1, 4), 4), _x((1, 6, 1, 4), 5)
    ones = jnp.ones((1, 6, 1, 3))
    want = np.mean(np.log(np.arange(1, 7)))
    np.testing.assert_allclose(float(attention_distillation_loss(q, k, ones, ones)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="hedgehog"):
        hedgehog_distillation_loss(LinearAttention(D, H, rngs=nnx.Rngs(0)), x)


# ----------------------------------------------------------------------------- every layer


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forms_and_dtypes(name):
    """fp32: decoding (prefill + steps, packed token by token, packed in pieces) and packed documents equal
    the parallel form; bf16 compute: bf16 output close to fp32, parameters stay fp32."""
    m = LAYERS[name](rngs=nnx.Rngs(1))
    x = _x((B, T, D), 2)
    out = _all_forms(m, x)
    full = out["full"]
    assert full.shape == (B, T, D) and full.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(full)))
    assert_close(out["prefill"], full, name=f"{name}: prefill + steps vs parallel")
    assert_close(out["packed_a"], out["docs"], name=f"{name}: packed vs per document")
    for key in ("tokens_seg", "prefill_seg"):
        assert_close(out[key], out["packed_b"], name=f"{name}: {key} vs packed parallel")
    assert_not_close(out["packed_a"], full, name=f"{name}: segments have an effect")

    m16 = LAYERS[name](dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    params = jax.tree_util.tree_leaves(nnx.state(m16, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    y = _forward(m16, x.astype(jnp.bfloat16))
    assert y.shape == (B, T, D) and y.dtype == jnp.bfloat16
    rms, _, _ = errors(y, full)
    assert rms < 5e-2, f"{name}: bf16 vs fp32 relative rms {rms:.3g}"


def test_caches_and_layer_details():
    m = GatedDeltaNet(D, H, rngs=nnx.Rngs(0))
    cache = m.init_cache(B, 100)
    assert isinstance(cache, RecurrentCache) and cache.state.shape == (B, H, 8, 8)
    assert cache.state.dtype == jnp.float32 and len(cache.conv) == 3
    assert int(cache.next_pos) == 0 and cache.seg_id.tolist() == [-1, -1]
    la = LinearAttention(D, H, feature_map="taylor", rngs=nnx.Rngs(0))
    assert la.key_dim == 16 and la.init_cache(1, 4).state.shape == (1, H, 153, 9)  # [v, 1] normalizer column
    hedgehog = LinearAttention(D, H, feature_map="hedgehog", rngs=nnx.Rngs(0))
    assert hedgehog.init_cache(1, 4).state.shape == (1, H, 16, 9)  # 2 * key_dim features
    assert LinearAttention(D, H, feature_map="identity", rngs=nnx.Rngs(0)).o_norm is not None
    based = Based(D, H, rngs=nnx.Rngs(0))
    bc = based.init_cache(B, 100)
    assert isinstance(bc, BasedCache) and bc.linear.state.shape == (B, H, 153, 9) and bc.window.k.shape[1] == 64
    # decode caches are pytrees that jit and scan carry
    assert len(jax.tree_util.tree_leaves(bc)) > 5
    # Retention uses RetNet's fixed decays; positions shift nothing but the RoPE phase (relative)
    r = Retention(D, H, rngs=nnx.Rngs(0))
    x = _x((1, 5, D), 1)
    assert_close(_forward(r, x, jnp.arange(5) + 7), _forward(r, x), name="RoPE is relative")
    # allow_neg_eigval doubles beta
    g1 = GatedDeltaNet(D, H, rngs=nnx.Rngs(0))
    g2 = GatedDeltaNet(D, H, allow_neg_eigval=True, rngs=nnx.Rngs(0))
    assert_not_close(_forward(g1, x), _forward(g2, x), name="allow_neg_eigval has an effect")


@pytest.mark.parametrize("make, match", [
    (lambda: LinearAttention(D, H, feature_map="cosine", rngs=nnx.Rngs(0)), "feature_map"),
    (lambda: LinearAttention(15, 2, rngs=nnx.Rngs(0)), "num_heads must divide d_model"),
    (lambda: LinearAttention(D, H, eps=0.0, rngs=nnx.Rngs(0)), "eps"),
    (lambda: GatedDeltaNet(D, 3, rngs=nnx.Rngs(0)), "num_heads must divide d_model"),
    (lambda: GatedDeltaNet(D, H, short_conv=-1, rngs=nnx.Rngs(0)), "short_conv"),
    (lambda: GatedLinearAttention(D, H, short_conv=2.0, rngs=nnx.Rngs(0)), "short_conv"),
    (lambda: DeltaNet(D, H, allow_neg_eigval=1, rngs=nnx.Rngs(0)), "allow_neg_eigval"),
    (lambda: GatedLinearAttention(D, H, gate_logit_normalizer=0, rngs=nnx.Rngs(0)), "gate_logit_normalizer"),
    (lambda: GatedLinearAttention(D, H, gate_low_rank=0, rngs=nnx.Rngs(0)), "gate_low_rank"),
    (lambda: SimpleGLA(D, 0, rngs=nnx.Rngs(0)), "num_heads"),
    (lambda: Retention(D, H, head_dim=5, rngs=nnx.Rngs(0)), "even head_dim"),
    (lambda: Based(D, H, window=0, rngs=nnx.Rngs(0)), "window"),
    (lambda: Based(D, H, feature_dim=2.0, rngs=nnx.Rngs(0)), "feature_dim"),
    (lambda: SimpleGLA(D, H, chunk_size=0, rngs=nnx.Rngs(0)), "chunk_size"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_call_arguments():
    m = DeltaNet(D, H, rngs=nnx.Rngs(0))
    x = _x((1, 3, D))
    with pytest.raises(ValueError, match=r"\[batch, seq, 16\]"):
        m(x[..., :8])
    with pytest.raises(ValueError, match="positions"):
        m(x, positions=jnp.arange(4))
    with pytest.raises(ValueError, match="segment_ids"):
        m(x, segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="RecurrentCache"):
        m.decode(x, {"state": None})
    with pytest.raises(ValueError, match="conv caches"):
        m.decode(x, LinearAttention(D, H, rngs=nnx.Rngs(0)).init_cache(1, 3))
    with pytest.raises(ValueError, match="segment_ids"):
        m.decode(x, m.init_cache(1, 3), segment_ids=jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="BasedCache"):
        Based(D, H, rngs=nnx.Rngs(0)).decode(x, m.init_cache(1, 3))


# ----------------------------------------------------------------------------- mixers in an LM


def test_mixers_registered():
    names = {"linear", "hedgehog", "retnet", "simple_gla", "gla", "deltanet", "gdn", "based"}
    assert names <= set(registered_mixers())
    for family, module in (("gated_delta_rule", "GatedDeltaNet"), ("delta_rule", "DeltaNet"),
                           ("gla", "GatedLinearAttention"), ("simple_gla", "SimpleGLA"), ("retention", "Retention"),
                           ("linear_attention", "LinearAttention"), ("linear_attention", "Based")):
        assert f"seqmix.nn.{module}" in get_family(family).modules
    LMConfig(mixers="linear:hedgehog,based:8,linear")
    assert LMConfig(mixers="gla*2, swa:8 * 3,attn").mixer_specs == [("gla", None)] * 2 + [("swa", "8")] * 3 + [
        ("attn", None)]
    bad = (("linear:cosine", "feature map"), ("gdn:3", "takes no argument"), ("based:x", "positive integer"),
           ("gla*0", "repeat count"), ("gla*two", "repeat count"), ("gdn:3*2", "takes no argument"))
    for spec, match in bad:
        with pytest.raises(ValueError, match=match):
            LMConfig(mixers=spec)


@nnx.jit
def _lm_forms(model, tokens):
    out = {"full": model(tokens)}
    b, t = tokens.shape

    def body(c, tok):
        logits, c = model.decode(tok[:, None], c)
        return c, logits[:, 0]

    first, c = model.decode(tokens[:, :5], model.init_cache(b, t))  # prefill, then one token at a time
    _, steps = jax.lax.scan(body, c, jnp.moveaxis(tokens[:, 5:], 1, 0))
    out["prefill"] = jnp.concatenate([first, jnp.moveaxis(steps, 0, 1)], axis=1)
    return out


@pytest.mark.parametrize("spec", ["gdn", "gdn,attn", "based,attn", "linear:taylor", "retnet,gla,simple_gla,deltanet"])
def test_lm_decode_equals_forward(spec):
    model = LM(LMConfig(vocab_size=17, d_model=D, num_heads=H, mixers=spec, max_len=16), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 17, jnp.int32)
    out = _lm_forms(model, tokens)
    assert out["full"].shape == (B, T, 17) and bool(jnp.all(jnp.isfinite(out["full"])))
    assert_close(out["prefill"], out["full"], name=f"{spec}: prefill + token-by-token decode")


def test_lm_generate_gdn():
    model = LM(LMConfig(vocab_size=17, d_model=D, num_heads=H, mixers="gdn", max_len=16), rngs=nnx.Rngs(2))
    prompt = jax.random.randint(jax.random.PRNGKey(3), (1, 4), 0, 17, jnp.int32)
    out = model.generate(prompt, 3)
    assert out.shape == (1, 7)
    logits = nnx.jit(lambda m, t: m(t))(model, out)
    assert bool(jnp.all(jnp.argmax(logits[:, 3:-1], -1) == out[:, 4:]))


def test_gdn_trains_on_mqar():
    vocab, seq = 16, 12
    batch = mqar.generate(np.random.default_rng(0), 16, seq, vocab_size=vocab, num_kv_pairs=3)
    inputs, targets, mask = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask"))
    model = LM(LMConfig(vocab_size=vocab, d_model=D, num_heads=H, mixers="gdn", max_len=seq), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
