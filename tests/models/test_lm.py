"""seqmix.models: mixer specs and registry, LMConfig, LM forward / decode / generate / packing."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seqmix.models import LM, MIXERS, LMConfig, parse_mixers, register_mixer
from seqmix.models.mixers import int_arg
from seqmix.nn import Attention
from seqmix.testing import assert_close

SMALL = dict(vocab_size=17, d_model=16, num_heads=2, max_len=32)


@nnx.jit
def _forward(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions=positions, segment_ids=segment_ids)


@nnx.jit
def _decode(model, tokens, caches):
    return model.decode(tokens, caches)


def _tokens(shape, seed=0, vocab=17):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab, jnp.int32)


# ----------------------------------------------------------------------------- specs and registry


def test_parse_mixers_good_specs():
    assert parse_mixers("attn,swa:128,attn") == [("attn", None), ("swa", "128"), ("attn", None)]
    assert parse_mixers(" attn , swa : 8 ,chunk:4,stream:16 ") == [
        ("attn", None), ("swa", "8"), ("chunk", "4"), ("stream", "16")]
    assert parse_mixers("attn") == [("attn", None)]


@pytest.mark.parametrize("spec, match", [
    ("", "non-empty"), ("attn,,attn", "entry 1 is empty"), ("attn,", "entry 1 is empty"),
    ("mamba", "unknown mixer 'mamba'.*registered: .*'attn'.*'swa'"), ("swa", "positive integer"),
    ("swa:abc", "positive integer"), ("swa:0", "positive integer"), ("swa:-3", "positive integer"),
    ("swa:", "no argument"), ("attn:3", "takes no argument"), (None, "non-empty"),
])
def test_parse_mixers_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mixers(spec)


def test_registry_is_open_to_new_mixers():
    calls = []

    def factory(config, arg, *, rngs):
        calls.append(arg)
        return Attention(config.d_model, config.num_heads, rope=False, rngs=rngs)

    register_mixer("test_norope", factory, doc="attention without RoPE")
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_mixer("test_norope", factory)
        cfg = LMConfig(**SMALL, mixers="test_norope:x,attn")
        model = LM(cfg, rngs=nnx.Rngs(0))
        assert calls == ["x"] and model.blocks[0].mixer.rope is False
        assert _forward(model, _tokens((1, 4))).shape == (1, 4, 17)
    finally:
        MIXERS.pop("test_norope", None)
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(**SMALL, mixers="test_norope")
    with pytest.raises(ValueError, match="mixer name"):
        register_mixer("a,b", factory)
    with pytest.raises(ValueError):  # a mixer that needs an argument must register one that builds
        register_mixer("test_needs_arg", factory, check_arg=int_arg)
    assert "test_needs_arg" not in MIXERS


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_round_trip():
    cfg = LMConfig()
    assert cfg.num_layers == 2 and cfg.mlp_dim == 352 and cfg.head_dim == 32  # 8/3·128 -> 352
    custom = LMConfig(vocab_size=300, d_model=64, num_heads=4, num_kv_heads=2, mixers="attn, swa:16",
                      mlp_hidden=96, max_len=77, rope_theta=500000.0, tie_embeddings=False,
                      dtype="bfloat16", param_dtype="float32")
    for c in (cfg, custom):
        d = json.loads(json.dumps(c.to_dict()))
        assert LMConfig.from_dict(d) == c
    # missing fields take their defaults, except short_conv: a config saved before it existed had none
    assert LMConfig.from_dict({"d_model": 32, "num_heads": 2}) == LMConfig(d_model=32, num_heads=2, short_conv=0)
    assert cfg.short_conv == 4 and LMConfig.from_dict(cfg.to_dict()).short_conv == 4


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, num_heads=4), "num_heads must divide d_model"),
    (dict(num_kv_heads=3), "num_kv_heads must divide num_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dtype="float64"), "LMConfig.dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(mixers="attn,foo"), "LMConfig.mixers.*unknown mixer 'foo'"),
    (dict(mlp_hidden=-1), "mlp_hidden"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(d_model=6, num_heads=2), "even"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kw)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields.*'n_layers'"):
        LMConfig.from_dict({"n_layers": 3})


# ----------------------------------------------------------------------------- the model


def test_forward_shapes_hybrid_and_dtypes():
    cfg = LMConfig(**SMALL, mixers="attn,swa:8")
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert len(model.blocks) == 2
    assert model.blocks[1].mixer.mask.left == 7  # swa:8 = a causal window of 8 keys
    logits = _forward(model, _tokens((2, 12)))
    assert logits.shape == (2, 12, 17) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="tokens must be an int array"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="tokens must be an int array"):
        model(jnp.zeros((3,), jnp.int32))

    bf16 = LM(LMConfig(**SMALL, dtype="bfloat16", tie_embeddings=False), rngs=nnx.Rngs(0))
    params = jax.tree_util.tree_leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    out = _forward(bf16, _tokens((1, 5)))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_decode_token_by_token_equals_forward():
    cfg = LMConfig(**SMALL, num_kv_heads=1, mixers="attn,stream:3")
    model = LM(cfg, rngs=nnx.Rngs(1))
    tokens = _tokens((2, 10), 2)
    ref = _forward(model, tokens)

    caches = model.init_cache(2, 10)
    assert len(caches) == 2
    steps = []
    for i in range(10):
        logits, caches = _decode(model, tokens[:, i:i + 1], caches)
        steps.append(logits)
    assert_close(jnp.concatenate(steps, 1), ref, name="token by token")

    caches = model.init_cache(2, 10)
    first, caches = _decode(model, tokens[:, :7], caches)  # prompt longer than the windows
    rest = []
    for i in range(7, 10):
        logits, caches = _decode(model, tokens[:, i:i + 1], caches)
        rest.append(logits)
    assert_close(jnp.concatenate([first] + rest, 1), ref, name="prefill + steps")

    with pytest.raises(ValueError, match="caches must be a list of 2"):
        model.decode(tokens[:, :1], caches[:1])


def test_generate_shape_determinism_and_greedy():
    model = LM(LMConfig(**SMALL, mixers="attn,swa:4"), rngs=nnx.Rngs(3))
    prompt = _tokens((2, 5), 4)
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    assert bool(jnp.all(out[:, :5] == prompt))
    assert bool(jnp.all(model.generate(prompt, 6) == out))
    # greedy: every generated token is the argmax of the parallel logits at the previous position
    logits = _forward(model, out)
    assert bool(jnp.all(jnp.argmax(logits[:, 4:-1], -1) == out[:, 5:]))
    assert model.generate(prompt, 0).shape == (2, 5)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(prompt, 40)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


@pytest.mark.parametrize("spec", ["attn,swa:3", "chunk:4,stream:2"])
def test_packed_segments_equal_separate_documents(spec):
    """One packed row (positions restarting per document) equals one call per document."""
    model = LM(LMConfig(**SMALL, mixers=spec), rngs=nnx.Rngs(5))
    lengths = (4, 1, 3)
    docs = [_tokens((1, n), 10 + i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(docs, 1)
    seg = jnp.concatenate([jnp.full((1, n), i, jnp.int32) for i, n in enumerate(lengths)], 1)
    positions = jnp.concatenate([jnp.arange(n, dtype=jnp.int32) for n in lengths])
    got = _forward(model, packed, positions, seg)
    want = jnp.concatenate([_forward(model, d) for d in docs], 1)
    assert_close(got, want)


def test_token_ids_outside_the_vocabulary():
    model = LM(LMConfig(mixers="attn,gla", **SMALL), rngs=nnx.Rngs(0))
    for bad in ([[1, 17]], [[-1, 3]]):
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=17\)"):
            model(jnp.array(bad))
    with pytest.raises(ValueError, match="prompt must be ids"):
        model.generate(jnp.array([[3, 99]]), 2)
    # under jit the ids are unknown: the invalid ones (negative included) give NaN logits, never a wrapped id
    logits = _forward(model, jnp.array([[1, 2, 3, 4], [1, 2, 17, 4], [1, -1, 3, 4]]))
    assert bool(jnp.isfinite(logits[0]).all())
    assert bool(jnp.isnan(logits[1, 2:]).all()) and bool(jnp.isnan(logits[2, 1:]).all())
