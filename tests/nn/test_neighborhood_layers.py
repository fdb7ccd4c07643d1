"""Neighborhood attention layers: the vision modules (shapes, the op on their projections, axial RoPE,
GQA, errors) and the ``na`` mixer in a language model (decode and packed documents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import nn as snn
from seqmix import ops
from seqmix.models import LM, LMConfig
from seqmix.nn.neighborhood import parse_na_arg
from seqmix.testing import assert_close
from tests.models.test_lm import _decode, _forward

SMALL = dict(vocab_size=17, d_model=32, num_heads=4, max_len=32)


@pytest.mark.parametrize("cls, grid, opts", [
    (snn.NeighborhoodAttention1D, (11,), dict(kernel_size=5, dilation=2)),
    (snn.NeighborhoodAttention2D, (6, 9), dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))),
    (snn.NeighborhoodAttention3D, (3, 4, 5), dict(kernel_size=3)),
])
def test_module_is_the_op_on_its_projections(cls, grid, opts):
    layer = cls(24, 4, num_kv_heads=2, rngs=nnx.Rngs(0), **opts)
    x = jax.random.normal(jax.random.key(1), (2,) + grid + (24,))
    y = layer(x)
    assert y.shape == x.shape
    q, k, v = jnp.split(layer.qkv(x), [24, 36], axis=-1)
    heads = lambda a, h: a.reshape((2,) + grid + (h, 6))  # noqa: E731
    o = ops.neighborhood_attention(heads(q, 4), heads(k, 2), heads(v, 2), impl="reference", **opts)
    assert_close(y, layer.proj(o.reshape((2,) + grid + (24,))), name=cls.__name__)


def test_axial_rope_logits_depend_only_on_the_offset_per_axis():
    layer = snn.NeighborhoodAttention2D(16, 1, kernel_size=3, rope=True, rngs=nnx.Rngs(0))
    grid = (5, 6)
    rng = np.random.default_rng(0)
    qv, kv = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
    q = layer._axial_rope(jnp.broadcast_to(qv, (1,) + grid + (1, 16)), grid)[0, ..., 0, :]
    k = layer._axial_rope(jnp.broadcast_to(kv, (1,) + grid + (1, 16)), grid)[0, ..., 0, :]
    logit = lambda a, b: float(q[a] @ k[b])  # noqa: E731
    assert logit((0, 0), (1, 2)) == pytest.approx(logit((3, 3), (4, 5)), rel=1e-5, abs=1e-5)
    assert logit((2, 1), (0, 4)) == pytest.approx(logit((4, 2), (2, 5)), rel=1e-5, abs=1e-5)
    assert logit((0, 0), (1, 2)) != pytest.approx(logit((0, 0), (2, 1)), rel=1e-3)  # the axes differ
    y = layer(jax.random.normal(jax.random.key(2), (1,) + grid + (16,)))
    assert y.shape == (1,) + grid + (16,) and bool(jnp.isfinite(y).all())


def test_module_errors():
    with pytest.raises(ValueError, match="divisible by 2·ndim = 6"):
        snn.NeighborhoodAttention3D(16, 2, kernel_size=3, rope=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        snn.NeighborhoodAttention2D(16, 4, num_kv_heads=3, kernel_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple of 2"):
        snn.NeighborhoodAttention2D(16, 2, kernel_size=(3, 3, 3), rngs=nnx.Rngs(0))
    layer = snn.NeighborhoodAttention2D(16, 2, kernel_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, X, Y, 16\]"):
        layer(jnp.ones((1, 4, 16)))
    with pytest.raises(ValueError, match="exceeds the size"):
        layer(jnp.ones((1, 2, 4, 16)))


@pytest.mark.parametrize("arg, want", [("7", (7, 1)), ("3:2", (3, 2))])
def test_na_mixer_argument(arg, want):
    assert parse_na_arg(arg) == want


@pytest.mark.parametrize("bad", [None, "0", "3:0", "3:x", "3:2:1"])
def test_na_mixer_bad_argument(bad):
    with pytest.raises(ValueError, match="na:K or na:K:D"):
        parse_na_arg(bad)


def test_na_mixer_decode_and_packed_documents():
    model = LM(LMConfig(**SMALL, mixers="na:3:2,na:4"), rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 17)
    ref = _forward(model, tokens)
    caches = model.init_cache(2, 12)
    first, caches = _decode(model, tokens[:, :7], caches)  # a prompt longer than the rings (5 and 4 keys)
    rest = []
    for i in range(7, 12):
        logits, caches = _decode(model, tokens[:, i:i + 1], caches)
        rest.append(logits)
    assert_close(jnp.concatenate([first] + rest, 1), ref, name="prefill + steps")

    lengths = (5, 1, 6)
    docs = [jax.random.randint(jax.random.key(10 + i), (1, n), 0, 17) for i, n in enumerate(lengths)]
    seg = jnp.concatenate([jnp.full((1, n), i, jnp.int32) for i, n in enumerate(lengths)], 1)
    positions = jnp.concatenate([jnp.arange(n, dtype=jnp.int32) for n in lengths])
    got = _forward(model, jnp.concatenate(docs, 1), positions, seg)
    assert_close(got, jnp.concatenate([_forward(model, d) for d in docs], 1), name="packed vs separate")
