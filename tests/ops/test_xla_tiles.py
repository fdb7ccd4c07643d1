"""The ``xla`` form's tile policy (``seqmix.ops.xla_tiles``): which tiles a call with none named gets, that
named tiles win, and that the large tiles compute the same attention (forward and gradients)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.ops import masks as M
from seqmix.ops import xla_tiles
from seqmix.testing import assert_close


LARGE = (512, 256)


@pytest.mark.parametrize("mask,t,heads,want", [
    (M.Causal(), 8192, 4, LARGE),                     # the measured case: B·Hq = 4
    (M.Full(), 4096, 4, LARGE),
    (M.LocalWindow(1024), 8192, 4, LARGE),            # fill ≈ 0.67 with 512-row blocks: still faster
    (M.ChunkedCausal(512), 4096, 4, LARGE),           # fill 0.5
    (M.Causal(), 8192, 8, (256, 256)),                # the same pairs per step over more heads
    (M.Causal(), 8192, 16, (256, 128)),
    (M.Causal(), 8192, 64, xla_tiles.SMALL),
    (M.Causal(), 1024, 4, xla_tiles.SMALL),           # too short for the steps to matter
    (M.LocalWindow(16), 8192, 4, xla_tiles.SMALL),    # a narrow band: large blocks would be mostly masked
])
def test_choice(mask, t, heads, want):
    assert xla_tiles.choose(mask, t, t, heads) == want
    q = jnp.zeros((1, t, heads, 8), jnp.float32)
    call = ops.get_family("attention").prepare(q, q, q, mask=mask)
    assert (call.block_q, call.block_kv) == want


def test_named_tiles_win_and_decode_stays_small():
    q = jnp.zeros((1, 4096, 4, 8), jnp.float32)
    call = ops.get_family("attention").prepare(q, q, q, mask=M.Causal(), block_q=64)
    assert (call.block_q, call.block_kv) == (64, LARGE[1])
    call = ops.get_family("attention").prepare(q[:, :1], q, q, mask=M.Causal())
    assert (call.block_q, call.block_kv) == (8, xla_tiles.SMALL[1])  # one query: the block shrinks to 8 rows


def test_large_tiles_match_small_tiles():
    """Causal T = 2100 (not a multiple of 512 or 256): default tiles (512, 256) against (128, 128), forward,
    lse and gradients, fp32."""
    t = 2100
    assert xla_tiles.choose(M.Causal(), t, t, 2) == LARGE
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(x, (1, t, 2, 16), jnp.float32) for x in ks[:3])
    w = jax.random.normal(ks[3], (1, t, 2, 16), jnp.float32)

    def run(**tiles):
        def loss(q, k, v):
            o, lse = ops.attention(q, k, v, mask=M.Causal(), return_lse=True, impl="xla", **tiles)
            return (o * w).sum() + lse.sum(), (o, lse)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (o, lse)), grads = run()
    (_, (o_s, lse_s)), grads_s = run(block_q=128, block_kv=128)
    assert_close(o, o_s, kind="fp32", role="out", name="o")
    assert_close(lse, lse_s, kind="fp32", role="out", name="lse")
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_s):
        assert_close(a, b, kind="fp32", role="grad", name=name)
