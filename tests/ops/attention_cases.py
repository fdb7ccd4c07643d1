"""Shared inputs for the attention conformance tests."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmix import ops
from seqmix.ops import masks as M
from seqmix.ops.neighborhood_mask import neighborhood
from seqmix.testing import packed_segments  # noqa: F401 - the tests import it from here


def qkv(seed, b, tq, s, hq, hkv, d, dtype=jnp.float32, dv=None):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    dv = d if dv is None else dv
    return (jax.random.normal(kq, (b, tq, hq, d), jnp.float32).astype(dtype),
            jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype),
            jax.random.normal(kv, (b, s, hkv, dv), jnp.float32).astype(dtype))


def attention_vjp(impl, q, k, v, sink, cts, **kwargs):
    """``((o, lse), (dq, dk, dv, dsink))`` of ``ops.attention(..., impl=impl)`` under one jit, as users run it
    (called eagerly, every primitive of the op and its VJP would compile on its own). ``cts = (do, dlse)``."""
    @jax.jit
    def go(q, k, v, sink, cts):
        def f(q, k, v, sink):
            return ops.attention(q, k, v, sink_logits=sink, return_lse=True, impl=impl, **kwargs)
        out, vjp = jax.vjp(f, q, k, v, sink)
        return out, vjp(cts)
    return go(q, k, v, sink, cts)


def random_block_sparse(t, s, block, density, seed=0):
    rng = np.random.default_rng(seed)
    nb_q, nb_k = -(-t // block), -(-s // block)
    blocks = rng.random((nb_q, nb_k)) < density
    dense = np.kron(blocks, np.ones((block, block), bool))[:t, :s]
    return M.Explicit(dense & (rng.random((t, s)) < 0.9))


MASKS = {
    "full": lambda t, s: M.Full(),
    "causal": lambda t, s: M.Causal(),
    "window": lambda t, s: M.LocalWindow(9),
    "two_sided": lambda t, s: M.SlidingWindow(3, 5),
    "chunked": lambda t, s: M.ChunkedCausal(16),
    "streaming": lambda t, s: M.streaming(8, 3),
    "prefix_lm": lambda t, s: M.PrefixLM(11),
    "power": lambda t, s: M.PowerAttention(5, window_blocks=2),  # blocks of 5 do not divide the tiles
    # indexed by position: queries sit at S - Tq .. S - 1, so the table needs S rows when Tq < S
    "explicit": lambda t, s: random_block_sparse(max(t, s), s, 16, 0.4),
    "composed": lambda t, s: (M.Causal() & M.SlidingWindow(20, None)) | (M.Sinks(2) & M.Causal()),
}

# Neighborhood attention on the flattened grid (the family's sequence-parallel cases): 1-D, and 2-D sharded
# along its first axis (row-major order keeps whole rows on one device).
NEIGHBORHOOD_MASKS = {
    "neighborhood_1d": lambda t, s: neighborhood((s,), 7, dilation=2),
    "neighborhood_2d": lambda t, s: neighborhood((8, s // 8), (3, 4), dilation=(1, 2), is_causal=(True, False)),
}


