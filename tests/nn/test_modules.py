"""seqmix.nn: RMSNorm, RoPE, SwiGLU, Attention (parallel form, GQA, masks, dtypes, decoding, bad input)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import ops
from seqmix.nn import Attention, Block, RMSNorm, SwiGLU, apply_rope, rope_frequencies
from seqmix.ops import masks
from seqmix.testing import assert_close, assert_not_close, errors

D_MODEL = 16


@nnx.jit
def _apply(mod, x, positions=None, segment_ids=None):
    """mod(x) under one jit (one compilation instead of one per eager primitive)."""
    return mod(x, positions=positions, segment_ids=segment_ids)


def _x(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


# ----------------------------------------------------------------------------- RMSNorm, RoPE, SwiGLU


def test_rmsnorm_values_and_dtypes():
    norm = RMSNorm(8)
    assert norm.scale.shape == (8,) and norm.scale.dtype == jnp.float32
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = _x((2, 3, 8))
    ref = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * np.arange(1.0, 9.0)
    assert_close(norm(x), ref)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert RMSNorm(8, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="RMSNorm"):
        norm(_x((2, 3, 5)))


def test_rope_relative_position_property():
    d = 8
    q, k = _x((1, 1, 1, d), 1), _x((1, 1, 1, d), 2)

    @jax.jit
    def _dot(m, n):
        return jnp.sum(apply_rope(q, m[None]) * apply_rope(k, n[None]))

    def dot(m, n):
        return float(_dot(jnp.int32(m), jnp.int32(n)))

    for shift in (1, 5, 100):
        np.testing.assert_allclose(dot(3, 1), dot(3 + shift, 1 + shift), rtol=1e-4, atol=1e-5)
    assert abs(dot(3, 1) - dot(4, 1)) > 1e-4  # and it does depend on the difference
    x = _x((2, 5, 3, d))
    assert_close(apply_rope(x, jnp.zeros(5, jnp.int32)), x)  # position 0 = identity
    y = apply_rope(x, jnp.arange(5))
    assert_close(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1))  # a rotation
    # [B, T] positions: row b uses its own positions
    pos_bt = jnp.stack([jnp.arange(5), jnp.arange(5) + 7])
    y_bt = apply_rope(x, pos_bt)
    assert_close(y_bt[0], apply_rope(x[:1], jnp.arange(5))[0])
    assert_close(y_bt[1], apply_rope(x[1:], jnp.arange(5) + 7)[0])
    assert apply_rope(x.astype(jnp.bfloat16), jnp.arange(5)).dtype == jnp.bfloat16
    assert rope_frequencies(d).shape == (d // 2,)


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(_x((1, 4, 2, 7)), jnp.arange(4))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(_x((1, 4, 2, 8)), jnp.arange(5))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(_x((1, 4, 2, 8)), jnp.arange(4.0))
    with pytest.raises(ValueError, match="rank 4"):
        apply_rope(_x((4, 2, 8)), jnp.arange(4))


def test_swiglu_shapes_and_values():
    mlp = SwiGLU(D_MODEL, 24, rngs=nnx.Rngs(0))
    x = _x((2, 3, D_MODEL))
    y = mlp(x)
    assert y.shape == (2, 3, D_MODEL)
    wg, wu, wd = mlp.gate.kernel[...], mlp.up.kernel[...], mlp.down.kernel[...]
    assert wg.shape == (D_MODEL, 24) and wd.shape == (24, D_MODEL)
    ref = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
    assert_close(y, ref)
    with pytest.raises(ValueError, match="hidden"):
        SwiGLU(D_MODEL, 0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- Attention, parallel form


def _manual_attention(mod: Attention, x, positions, segment_ids=None):
    """The module's computation spelled out: projections, qk-norm, RoPE, the op, output projection."""
    b, t, _ = x.shape
    q = (x @ mod.q_proj.kernel[...]).reshape(b, t, mod.num_heads, mod.head_dim)
    k = (x @ mod.k_proj.kernel[...]).reshape(b, t, mod.num_kv_heads, mod.head_dim)
    v = (x @ mod.v_proj.kernel[...]).reshape(b, t, mod.num_kv_heads, mod.head_dim)
    if mod.q_norm is not None:
        q, k = mod.q_norm(q), mod.k_norm(k)
    q, k = apply_rope(q, positions, theta=mod.rope_theta), apply_rope(k, positions, theta=mod.rope_theta)
    o = ops.attention(q, k, v, mask=mod.mask, segment_ids=segment_ids, soft_cap=mod.soft_cap,
                      sink_logits=None if mod.sink is None else mod.sink[...], impl="reference")
    return o.reshape(b, t, -1) @ mod.o_proj.kernel[...]


@nnx.jit
def _decode_step(mod, x, cache, segment_ids=None):
    return mod.decode(x, cache, segment_ids=segment_ids)


@nnx.jit
def _manual_jit(mod, x, positions, segment_ids=None):
    return _manual_attention(mod, x, positions, segment_ids)


@pytest.mark.parametrize("kw", [
    dict(num_heads=4),
    dict(num_heads=4, num_kv_heads=2, qk_norm=True, soft_cap=5.0),
    dict(num_heads=4, num_kv_heads=1, sink_logits=True, mask=masks.LocalWindow(3)),
], ids=["mha", "gqa_qknorm_cap", "mqa_sink_window"])
def test_attention_matches_op_with_module_projections(kw):
    mod = Attention(D_MODEL, rngs=nnx.Rngs(0), **kw)
    if mod.sink is not None:
        mod.sink[...] = jnp.linspace(-1.0, 1.0, mod.num_heads)
    x = _x((2, 7, D_MODEL))
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    assert_close(_apply(mod, x), _manual_jit(mod, x, jnp.arange(7)))
    assert_close(_apply(mod, x, segment_ids=seg), _manual_jit(mod, x, jnp.arange(7), seg))
    assert mod.k_proj.kernel.shape == (D_MODEL, mod.num_kv_heads * mod.head_dim)  # K/V never repeated


def test_attention_masks_and_positions():
    x = _x((1, 8, D_MODEL))
    causal = Attention(D_MODEL, 2, rngs=nnx.Rngs(0))
    window = Attention(D_MODEL, 2, mask=masks.LocalWindow(2), rngs=nnx.Rngs(0))
    y = _apply(causal, x)
    assert y.shape == (1, 8, D_MODEL) and y.dtype == jnp.float32
    assert_not_close(_apply(window, x), y)
    assert_close(_apply(window, x)[:, :2], y[:, :2])  # the first two rows see the same keys
    # causal: changing the last token leaves earlier rows alone
    y2 = _apply(causal, x.at[:, -1].add(1.0))
    assert_close(y2[:, :-1], y[:, :-1])
    assert_not_close(y2[:, -1:], y[:, -1:])
    # RoPE is relative and the mask is causal: shifting every position changes nothing
    assert_close(_apply(causal, x, jnp.arange(8) + 11), y)
    # sink logits: b -> -inf is no sink (same seed, same projections); a finite b has an effect
    sinky = Attention(D_MODEL, 2, sink_logits=True, rngs=nnx.Rngs(0))
    assert sinky.sink.shape == (2,) and float(jnp.abs(sinky.sink[...]).max()) == 0.0
    sinky.sink[...] = jnp.full((2,), -40.0)
    assert_close(_apply(sinky, x), y)
    sinky.sink[...] = jnp.full((2,), 2.0)
    assert_not_close(_apply(sinky, x), y)


def test_attention_bf16_compute():
    mod32 = Attention(D_MODEL, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    mod16 = Attention(D_MODEL, 4, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(mod16, nnx.Param)))
    x = _x((2, 6, D_MODEL))
    y16 = _apply(mod16, x)
    assert y16.dtype == jnp.bfloat16
    rms, _, _ = errors(y16, _apply(mod32, x))
    assert rms < 3e-2, rms
    cache = mod16.init_cache(2, 6)
    assert cache.k.dtype == jnp.bfloat16
    yd, _ = _decode_step(mod16, x, cache)
    assert yd.dtype == jnp.bfloat16


def test_attention_bad_arguments():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(D_MODEL, 4, num_kv_heads=3, rngs=rngs)
    with pytest.raises(ValueError, match="d_model"):
        Attention(18, 4, rngs=rngs)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(D_MODEL, 2, head_dim=5, rngs=rngs)
    with pytest.raises(ValueError, match="mask"):
        Attention(D_MODEL, 2, mask="causal", rngs=rngs)
    with pytest.raises(ValueError, match="soft_cap"):
        Attention(D_MODEL, 2, soft_cap=-1.0, rngs=rngs)
    mod = Attention(D_MODEL, 2, rngs=rngs)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        mod(_x((4, D_MODEL)))
    with pytest.raises(ValueError, match="x must have shape"):
        mod(_x((1, 4, D_MODEL + 1)))
    with pytest.raises(ValueError, match="positions"):
        mod(_x((1, 4, D_MODEL)), positions=jnp.arange(5))
    with pytest.raises(ValueError, match="cache"):
        mod.decode(_x((1, 1, D_MODEL)), None)
    with pytest.raises(ValueError, match="short_conv"):
        Attention(D_MODEL, 2, short_conv=-2, rngs=rngs)
    with pytest.raises(ValueError, match="AttentionCache"):  # a conv layer needs its conv caches too
        Attention(D_MODEL, 2, short_conv=4, rngs=rngs).decode(_x((1, 1, D_MODEL)), mod.init_cache(1, 4))


# ----------------------------------------------------------------------------- decoding




@pytest.mark.parametrize("kw", [
    dict(num_heads=2),
    dict(num_heads=2, mask=masks.LocalWindow(3)),
    dict(num_heads=2, mask=masks.streaming(3, 2), sink_logits=True),
    dict(num_heads=4, num_kv_heads=2, mask=masks.ChunkedCausal(4)),
    dict(num_heads=4, num_kv_heads=1),
    dict(num_heads=4, num_kv_heads=2, short_conv=3),
    dict(num_heads=2, mask=masks.LocalWindow(3), short_conv=4),
], ids=["causal", "window3", "streaming3+2", "gqa_chunk4", "mqa", "gqa_short_conv3", "window3_short_conv4"])
def test_decode_equals_parallel(kw):
    """Token by token, and prefill (a prompt longer than the window) then single tokens."""
    mod = Attention(D_MODEL, rngs=nnx.Rngs(1), **kw)
    if mod.sink is not None:
        mod.sink[...] = jnp.full((mod.num_heads,), 0.5)
    t, prompt = 9, 6
    x = _x((2, t, D_MODEL), 3)
    ref = _apply(mod, x)

    cache = mod.init_cache(2, t)
    steps = []
    for i in range(t):
        y, cache = _decode_step(mod, x[:, i:i + 1], cache)
        steps.append(y)
    assert_close(jnp.concatenate(steps, 1), ref, name="token by token")
    assert int(cache.next_pos) == t

    cache = mod.init_cache(2, t)
    y0, cache = _decode_step(mod, x[:, :prompt], cache)
    outs = [y0]
    for i in range(prompt, t):
        y, cache = _decode_step(mod, x[:, i:i + 1], cache)
        outs.append(y)
    assert_close(jnp.concatenate(outs, 1), ref, name="prefill + steps")


def test_decode_multi_token_steps_through_a_window_ring():
    """Chunks of 2 new tokens into a ring of 3 (window 3) still equal the parallel form."""
    mod = Attention(D_MODEL, 2, mask=masks.LocalWindow(3), rngs=nnx.Rngs(2))
    x = _x((1, 8, D_MODEL), 4)
    ref = _apply(mod, x)
    cache = mod.init_cache(1, 8)
    assert cache.n_slots == 3
    outs = []
    for i in range(0, 8, 2):
        y, cache = _decode_step(mod, x[:, i:i + 2], cache)
        outs.append(y)
    assert_close(jnp.concatenate(outs, 1), ref)


@pytest.mark.parametrize("short_conv", [None, 4])
def test_decode_packed_segments(short_conv):
    mod = Attention(D_MODEL, 2, short_conv=short_conv, rngs=nnx.Rngs(0))
    x = _x((2, 6, D_MODEL), 5)
    seg = jnp.array([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]], jnp.int32)
    ref = _apply(mod, x, segment_ids=seg)
    cache = mod.init_cache(2, 6)
    y0, cache = _decode_step(mod, x[:, :3], cache, seg[:, :3])
    y1, cache = _decode_step(mod, x[:, 3:], cache, seg[:, 3:])
    assert_close(jnp.concatenate([y0, y1], 1), ref)


def test_block_residual_structure():
    mod = Attention(D_MODEL, 2, rngs=nnx.Rngs(0))
    block = Block(mod, D_MODEL, 32, rngs=nnx.Rngs(0))
    x = _x((1, 5, D_MODEL))
    h = x + _apply(mod, block.mixer_norm(x))
    y = _apply(block, x)
    assert_close(y, h + block.mlp(block.mlp_norm(h)))
    y_dec, _ = _decode_step(block, x, block.init_cache(1, 5))
    assert_close(y_dec, y)
