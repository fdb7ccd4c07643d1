"""Neighborhood attention: NATTEN's mask rule (hand-worked rows, the classic window formula, special cases),
sound block bounds on 1-D/2-D/3-D grids, and the op against dense softmax, forward and backward."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.ops import block_meta
from seqmix.ops import masks as M
from seqmix.ops.neighborhood import neighborhood_attention
from seqmix.ops.neighborhood_mask import neighborhood

jax.config.update("jax_default_matmul_precision", "highest")


@functools.partial(jax.jit, static_argnums=0)
def _dense(mask):
    p = jnp.arange(mask.tokens)
    return mask.allowed(M.Coords(p[:, None], p[:, None]), M.Coords(p[None, :], p[None, :]))


def dense(mask) -> np.ndarray:
    """The mask's boolean [T, T] matrix (one compiled program per mask: eager ops would compile per op)."""
    return np.asarray(_dense(mask))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _classes(mask, t, bq, bk):
    tp, sp = -(-t // bq) * bq, -(-t // bk) * bk
    pos = jnp.arange(t, dtype=jnp.int32)
    q_pos, kv_pos = block_meta.pad_to(pos, 0, tp), block_meta.pad_to(pos, 0, sp, -1)
    classify = functools.partial(block_meta.classify_blocks, mask, q_seg=None, kv_seg=None, block_q=bq, block_kv=bk)
    # jitted: one program per configuration instead of one compile per primitive
    return jax.jit(lambda qp, kp, valid: classify(qp, kp, qp[None], kp[None], q_valid=valid))(
        q_pos, kv_pos, jnp.arange(tp) < t)


def keys_of(mask, i) -> list[int]:
    return [int(j) for j in np.nonzero(dense(mask)[i])[0]]


@pytest.mark.parametrize("mask, rows", [
    (neighborhood((7,), 3), {0: [0, 1, 2], 3: [2, 3, 4], 6: [4, 5, 6]}),  # shifted, not truncated, at borders
    (neighborhood((7,), 4), {0: [0, 1, 2, 3], 3: [1, 2, 3, 4], 6: [3, 4, 5, 6]}),  # even kernel: 2 left, 1 right
    (neighborhood((7,), 3, is_causal=True), {0: [0], 1: [0, 1], 4: [2, 3, 4]}),
    (neighborhood((7,), 2, dilation=2), {0: [0, 2], 5: [3, 5], 6: [4, 6]}),  # groups {0,2,4,6} and {1,3,5}
    (neighborhood((8,), 4, stride=2), {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [1, 2, 3, 4], 7: [4, 5, 6, 7]}),
    (neighborhood((9,), 3, stride=3, is_causal=True), {3: [3], 4: [3, 4], 5: [3, 4, 5], 8: [6, 7, 8]}),
])
def test_hand_worked_rows(mask, rows):
    for i, want in rows.items():
        assert keys_of(mask, i) == want, i


def _classic_window(i, length, k):
    """The original NA window start (odd k, no dilation or stride): centred, shifted inside at borders."""
    start = max(i - k // 2, 0)
    if i + k // 2 >= length:
        start += length - i - k // 2 - 1
    return list(range(start, start + k))


@pytest.mark.parametrize("length, k", [(5, 3), (9, 5), (11, 11), (13, 7)])
def test_matches_the_classic_window_formula(length, k):
    mask = neighborhood((length,), k)
    for i in range(length):
        assert keys_of(mask, i) == _classic_window(i, length, k), i


def test_two_dim_is_the_product_of_one_dim_rules():
    mask2 = neighborhood((6, 7), (3, 4), dilation=(2, 1), stride=(1, 2), is_causal=(False, True))
    m_x = dense(neighborhood((6,), 3, dilation=2))
    m_y = dense(neighborhood((7,), 4, stride=2, is_causal=True))
    want = np.einsum("ac,bd->abcd", m_x, m_y).reshape(42, 42).astype(bool)
    np.testing.assert_array_equal(dense(mask2), want)


@pytest.mark.parametrize("shape, kernel", [((6, 5), (3, 3)), ((4, 6, 5), (3, 3, 5))])
def test_every_non_causal_query_sees_exactly_the_kernel_volume(shape, kernel):
    assert (dense(neighborhood(shape, kernel)).sum(-1) == np.prod(kernel)).all()


def test_special_cases():
    assert dense(neighborhood((6, 5), (6, 5))).all()  # kernel == size: full attention
    blocked = dense(neighborhood((12,), 3, stride=3))  # stride == kernel: blocked attention
    np.testing.assert_array_equal(blocked, (np.arange(12)[:, None] // 3) == (np.arange(12)[None, :] // 3))
    causal = dense(neighborhood((10,), 10, is_causal=True))
    np.testing.assert_array_equal(causal, np.tril(np.ones((10, 10), bool)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(5,), kernel_size=7), "exceeds the size"),
    (dict(shape=(9,), kernel_size=3, dilation=4), "kernel_size × dilation"),
    (dict(shape=(9,), kernel_size=3, stride=4), "stride 4 exceeds kernel_size 3"),
    (dict(shape=(9, 9), kernel_size=(3, 3, 3)), "tuple of 2"),
    (dict(shape=(9,), kernel_size=0), ">= 1"),
    (dict(shape=(9,), kernel_size=3, is_causal=1), "must be a bool"),
    (dict(shape=(2, 2, 2, 2), kernel_size=1), "1-D, 2-D or 3-D"),
])
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neighborhood(**kwargs)


def _random_configs(rng, ndim, n):
    out = []
    for _ in range(n):
        shape = tuple(int(x) for x in rng.integers(3, 11, ndim))
        k = tuple(int(rng.integers(1, s + 1)) for s in shape)
        d = tuple(int(rng.integers(1, s // kk + 1)) for s, kk in zip(shape, k))
        st = tuple(int(rng.integers(1, kk + 1)) for kk in k)
        causal = tuple(bool(c) for c in rng.integers(0, 2, ndim))
        out.append(neighborhood(shape, k, d, st, causal))
    return out


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_block_bounds_are_sound(ndim):
    """EMPTY blocks hold no allowed pair and FULL blocks only allowed pairs, on random configurations and
    block sizes that do not divide the grid; and blocks do get skipped."""
    rng = np.random.default_rng(ndim)
    skipped = 0
    for mask in _random_configs(rng, ndim, 8):
        t = mask.tokens
        for bq, bk in ((8, 8), (16, 7)):
            tp, sp = -(-t // bq) * bq, -(-t // bk) * bk
            cls = np.asarray(_classes(mask, t, bq, bk))
            d = np.zeros((tp, sp), bool)
            d[:t, :t] = dense(mask)
            blocks = d.reshape(tp // bq, bq, sp // bk, bk)
            has_any = blocks.any(axis=(1, 3))
            rows_valid = (np.arange(tp) < t).reshape(tp // bq, bq)[:, :, None, None]
            all_valid = (blocks | ~rows_valid).all(axis=(1, 3))  # padded query rows are dropped
            assert not (has_any & (cls == M.EMPTY)).any(), (mask, bq, bk)
            assert all_valid[cls == M.FULL].all(), (mask, bq, bk)
            skipped += int((cls == M.EMPTY).sum())
    assert skipped > 0


def _dense_softmax(q, k, v, allowed, scale):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = jnp.where(allowed, s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", range(4))
def test_op_matches_dense_softmax_forward_and_backward(impl, case):
    rng = np.random.default_rng(10 + case)
    ndim = [1, 2, 3, 2][case]
    mask = _random_configs(rng, ndim, 1)[0]
    grid, b, h, dh = mask.shape, 2, 2, 8
    q, k, v, do = (jnp.asarray(rng.standard_normal((b,) + grid + (h, dh)), jnp.float32) for _ in range(4))
    opts = dict(kernel_size=mask.kernel_size, dilation=mask.dilation, stride=mask.stride, is_causal=mask.is_causal)
    t = mask.tokens
    flat = lambda x: x.reshape(b, t, h, dh)  # noqa: E731

    def ours(q, k, v):
        return neighborhood_attention(q, k, v, impl=impl, block_q=16, block_kv=16, **opts)

    allowed = dense(mask)  # numpy, outside the jit

    def want(q, k, v):
        return _dense_softmax(flat(q), flat(k), flat(v), allowed, dh ** -0.5).reshape(q.shape)

    o, pull = jax.vjp(jax.jit(ours), q, k, v)  # jitted: one program, not one compile per primitive
    o_r, pull_r = jax.vjp(jax.jit(want), q, k, v)
    testing.assert_close(o, o_r, role="out", name=f"o {mask}")
    for g, g_r, n in zip(pull(do), pull_r(do), ("dq", "dk", "dv")):
        assert np.isfinite(np.asarray(g)).all(), n
        testing.assert_close(g, g_r, role="grad", name=f"{n} {mask}")


def test_gqa_and_lse():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 6, 5, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 6, 5, 2, 8)), jnp.float32)
    o, lse = neighborhood_attention(q, kv, kv, kernel_size=3, return_lse=True, impl="xla")
    assert o.shape == q.shape and lse.shape == (1, 4, 6, 5)
    o_full = neighborhood_attention(q, kv, kv, kernel_size=(6, 5), impl="xla")
    want = jax.nn.dot_product_attention(q.reshape(1, 30, 4, 8), kv.reshape(1, 30, 2, 8), kv.reshape(1, 30, 2, 8))
    testing.assert_close(o_full, want.reshape(q.shape), role="out", name="kernel == size is full attention")
    with pytest.raises(ValueError, match="cover q's batch and grid"):
        neighborhood_attention(q, kv[:, :5], kv[:, :5], kernel_size=3)
    with pytest.raises(ValueError, match=r"\[B, X, H, D\]"):
        neighborhood_attention(q[0, 0], kv[0, 0], kv[0, 0], kernel_size=3)


# ----------------------------------------------------------------------------- the size-free 1-D causal rule


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_relative(mask, t):
    p = jnp.arange(t)
    return mask.allowed(M.Coords(p[:, None], p[:, None]), M.Coords(p[None, :], p[None, :]))


@pytest.mark.parametrize("t, k, d", [(20, 3, 1), (20, 4, 3), (9, 3, 3), (7, 7, 1)])
def test_causal_neighborhood_equals_the_grid_rule(t, k, d):
    """``CausalNeighborhood(k, d)`` is ``neighborhood((T,), k, d, is_causal=True)`` at every length."""
    from seqmix.ops import CausalNeighborhood

    mask = CausalNeighborhood(k, d)
    np.testing.assert_array_equal(np.asarray(_dense_relative(mask, t)), dense(neighborhood((t,), k, d, is_causal=True)))
    assert mask.cache_extent() == ((k - 1) * d + 1, 0)
    for bq, bk in ((8, 8), (16, 8)):
        tp, sp = -(-t // bq) * bq, -(-t // bk) * bk
        pos = jnp.arange(t, dtype=jnp.int32)
        q_pos, kv_pos = block_meta.pad_to(pos, 0, tp), block_meta.pad_to(pos, 0, sp, -1)
        cls = np.asarray(block_meta.classify_blocks(mask, q_pos, kv_pos, q_pos[None], kv_pos[None], None, None,
                                                    jnp.arange(tp) < t, bq, bk))
        full = np.zeros((tp, sp), bool)
        full[:t, :t] = np.asarray(_dense_relative(mask, t))
        blocks = full.reshape(tp // bq, bq, sp // bk, bk)
        assert not (blocks.any(axis=(1, 3)) & (cls == M.EMPTY)).any()
        rows_valid = (np.arange(tp) < t).reshape(tp // bq, bq)[:, :, None, None]
        assert (blocks | ~rows_valid).all(axis=(1, 3))[cls == M.FULL].all()
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        CausalNeighborhood(0)


def test_causal_neighborhood_decode_equals_the_parallel_op():
    """1-D causal decode: a ring of (K − 1)·D + 1 keys, a prompt then single tokens, equals the op."""
    from seqmix import ops

    rng = np.random.default_rng(4)
    t, k, d = 23, 4, 3
    q = jnp.asarray(rng.standard_normal((2, t, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, t, 2, 8)), jnp.float32)
    want = neighborhood_attention(q, kv, kv, kernel_size=k, dilation=d, is_causal=True, impl="reference")
    mask = ops.CausalNeighborhood(k, d)
    ring, n_sink = ops.cache_size_for(mask, t)
    assert (ring, n_sink) == ((k - 1) * d + 1, 0)
    cache = ops.init_kv_cache(2, 2, 8, ring=ring, n_sink=n_sink, dtype=jnp.float32)
    step = jax.jit(lambda q, k, v, c: ops.attention_decode(q, k, v, c, mask=mask))
    outs, (o, cache) = [], step(q[:, :13], kv[:, :13], kv[:, :13], cache)  # a prompt longer than the ring
    outs.append(o)
    for i in range(13, t):
        o, cache = step(q[:, i:i + 1], kv[:, i:i + 1], kv[:, i:i + 1], cache)
        outs.append(o)
    testing.assert_close(jnp.concatenate(outs, 1), want, role="out", name="decode vs parallel")


@pytest.mark.parametrize("grid, opts", [
    ((7, 4, 5), dict(kernel_size=(3, 3, 3), dilation=(2, 1, 1), is_causal=(True, False, False))),
    ((6, 9), dict(kernel_size=(2, 4), dilation=(1, 2), is_causal=(True, True))),  # even kernel, causal rows too
])
def test_video_decode_a_frame_at_a_time_equals_the_parallel_op(grid, opts):
    """Causal in time: a ring of ((K_t − 1)·D_t + 1) frames, the first two frames at once then one per
    step, in a mask built for more frames than decoded; equals the op on the whole clip."""
    from seqmix import ops

    rng = np.random.default_rng(5)
    frames, frame = grid[0], grid[1:]
    q = jnp.asarray(rng.standard_normal((2, *grid, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, *grid, 2, 8)), jnp.float32)
    want = neighborhood_attention(q, kv, kv, impl="reference", **opts)
    mask = neighborhood((frames + 3, *frame), **opts)
    ring, n_sink = ops.cache_size_for(mask, mask.tokens)
    size = int(np.prod(frame))
    assert ring == ((opts["kernel_size"][0] - 1) * opts["dilation"][0] + 1) * size and n_sink == 0
    cache = ops.init_kv_cache(2, 2, 8, ring=ring, n_sink=0)
    step = jax.jit(lambda q, k, v, c: ops.neighborhood_decode(q, k, v, c, mask=mask))
    o, cache = step(q[:, :2], kv[:, :2], kv[:, :2], cache)
    outs = [o]
    for t in range(2, frames):
        o, cache = step(q[:, t:t + 1], kv[:, t:t + 1], kv[:, t:t + 1], cache)
        outs.append(o)
    testing.assert_close(jnp.concatenate(outs, 1), want, role="out", name="video decode vs parallel")
    half = ops.init_kv_cache(2, 2, 8, ring=ring, n_sink=0)
    _, half = ops.attention_decode(q[:, 0, :1].reshape(2, -1, 4, 8), kv[:, 0, :1].reshape(2, -1, 2, 8),
                                   kv[:, 0, :1].reshape(2, -1, 2, 8), half, mask=mask)
    with pytest.raises(ValueError, match="not whole frames"):
        ops.neighborhood_decode(q[:, :1], kv[:, :1], kv[:, :1], half, mask=mask)
    with pytest.raises(ValueError, match="causal along its first axis"):
        ops.neighborhood_decode(q[:, :1], kv[:, :1], kv[:, :1], cache, mask=neighborhood(grid, 3))
