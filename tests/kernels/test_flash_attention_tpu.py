"""Pallas TPU flash attention in interpret mode on CPU, against the reference (FAMILIES.md §5.4).

Forward (o, lse) and VJP (dq, dk, dv, d sink, cotangents on o and lse) at small shapes: lengths
that are not block multiples, every computable mask kind, GQA ratios 1/2/4, packed documents, sink
logits, soft cap, fully masked rows, keys with holes, bf16. Tiles are pinned to the interpret entry
of ``seqmix.ops.tpu.tiles`` (32-row q blocks, 64-key kv blocks walked in two 32-key chunks), so a
75-token sequence crosses several block and chunk boundaries with partial tails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _target as _interpret
from seqmix import ops
from seqmix.ops import _registry
from seqmix.ops.tpu import attention as attention_pallas
from seqmix.ops.tpu import tiles as tpu_blocks
from seqmix.ops import masks as M
from seqmix.testing import assert_close, tolerance_kind
from tests.ops.attention_cases import MASKS, attention_vjp, packed_segments, qkv

pytestmark = pytest.mark.interpret

INTERPRET_TILES = tpu_blocks.TABLE["interpret"]


@pytest.fixture(autouse=True)
def _pinned_interpret():
    with _interpret.force("tpu"), tpu_blocks.pinned(INTERPRET_TILES):
        yield


def compare(q, k, v, *, sink=None, kind=None, seed=1, **kwargs):
    """Kernel vs reference: o, lse, dq, dk, dv (and d sink). Returns the kernel's (o, lse)."""
    call = ops.get_family("attention").prepare(q, k, v, sink_logits=sink, **kwargs)
    assert attention_pallas.supports(call) is None, attention_pallas.supports(call)
    kind = kind or tolerance_kind(q.dtype, "softmax")
    b, tq, hq, _ = q.shape
    kd, kl = jax.random.split(jax.random.PRNGKey(seed))
    do = jax.random.normal(kd, (b, tq, hq, v.shape[-1]), jnp.float32).astype(q.dtype)
    dlse = jax.random.normal(kl, (b, hq, tq), jnp.float32)
    (o, lse), g = attention_vjp("pallas_tpu", q, k, v, sink, (do, dlse), **kwargs)
    (o_ref, lse_ref), g_ref = attention_vjp("reference", q, k, v, sink, (do, dlse), **kwargs)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(o, o_ref, kind=kind, role="out", name="o")
    assert_close(lse, lse_ref, kind=kind, role="out", name="lse")
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], g_ref[:3]):
        assert a.dtype == r.dtype
        assert_close(a, r, kind=kind, role="grad", name=name)
    if sink is not None:
        assert_close(g[3], g_ref[3], kind=kind, role="gate", name="dsink")
    return o, lse


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("mask_name", sorted(set(MASKS) - {"explicit"}))
def test_masks_match_reference(mask_name):
    t = 75  # 3 q blocks (last one partial), 2 kv blocks of 2 chunks, padded keys in the tail
    q, k, v = qkv(0, 1, t, t, 2, 1, 16)
    compare(q, k, v, mask=MASKS[mask_name](t, t))


@pytest.mark.parametrize("mask_name", ["causal", "prefix_lm"])
def test_packed_documents(mask_name):
    t = 100
    q, k, v = qkv(1, 2, t, t, 2, 1, 8)
    # a length-1 document, documents ending on / just off chunk (32) boundaries, rows that differ
    seg = jnp.concatenate([packed_segments(1, t, [1, 31, 32, 33]), packed_segments(1, t, [64, 3])])
    compare(q, k, v, mask=MASKS[mask_name](t, t), segment_ids=seg)


@pytest.mark.parametrize("grid, opts", [((9, 10), dict(kernel_size=(3, 4), dilation=(2, 1), stride=(1, 2))),
                                         ((3, 5, 6), dict(kernel_size=(2, 3, 5), is_causal=(True, False, False)))])
def test_neighborhood_masks_match_reference(grid, opts):
    """2-D / 3-D neighborhood masks on flattened grids: the in-kernel predicate decodes grid coordinates."""
    t = int(np.prod(grid))
    q, k, v = qkv(5, 1, t, t, 2, 1, 16)
    compare(q, k, v, mask=ops.neighborhood(grid, **opts))


def test_gqa_group_of_four():
    # G = 4 here; G = 2 in the mask tests, G = 1 in test_keys_with_holes_and_explicit_positions.
    q, k, v = qkv(2, 1, 70, 90, 8, 2, 8, dv=24)  # cross lengths, v head dim != qk head dim
    compare(q, k, v, mask=M.Causal())


def test_sink_logits_soft_cap_and_window():
    q, k, v = qkv(4, 1, 80, 80, 4, 2, 16)
    sink = jnp.array([0.5, -2.0, 3.0, 0.0])
    o, _ = compare(q, k, v, sink=sink, soft_cap=2.0, mask=M.LocalWindow(20))
    plain = jax.jit(lambda q, k, v: ops.attention(q, k, v, mask=M.LocalWindow(20),
                                                  impl="pallas_tpu"))(q, k, v)
    assert float(jnp.max(jnp.abs(o - plain))) > 1e-2  # the features have an effect


def test_fully_masked_rows_are_zero_with_finite_grads():
    # q rows of segment 7 have no key of their segment.
    q, k, v = qkv(7, 1, 66, 70, 2, 1, 8)
    q_seg = jnp.array([[0] * 34 + [7] * 32], jnp.int32)
    kv_seg = jnp.zeros((1, 70), jnp.int32)
    o, lse = compare(q, k, v, segment_ids=(q_seg, kv_seg))
    assert jnp.all(o[0, 34:] == 0) and jnp.all(jnp.isneginf(lse[0, :, 34:]))
    sink = jnp.array([0.3, -0.7])
    o, lse = compare(q, k, v, segment_ids=(q_seg, kv_seg), sink=sink, mask=M.Causal())
    assert jnp.all(o[0, 34:] == 0)
    np.testing.assert_allclose(lse[0, :, 34:], jnp.broadcast_to(sink[:, None], (2, 32)), rtol=1e-6)


def test_keys_with_holes_and_explicit_positions():
    # A cache-like kv: empty slots (position -1) scattered, queries at explicit positions.
    s = 128
    q, k, v = qkv(8, 1, 80, s, 2, 2, 16)
    kv_pos = np.arange(s, dtype=np.int32)
    kv_pos[[3, 40, 41, 42, 100]] = -1
    kv_pos[110:] = -1
    q_pos = jnp.arange(30, 110, dtype=jnp.int32)
    compare(q, k, v, mask=M.streaming(16, 2), kv_positions=jnp.asarray(kv_pos), q_positions=q_pos)


def test_bf16():
    q, k, v = qkv(6, 1, 75, 75, 4, 2, 32, dtype=jnp.bfloat16)
    compare(q, k, v, mask=M.Causal(), segment_ids=packed_segments(1, 75, [30]),
            sink=jnp.zeros((4,), jnp.bfloat16))


def test_no_races_in_interpreter(capfd):
    q, k, v = qkv(9, 1, 66, 66, 2, 1, 8)
    with _interpret.force("tpu_races"):
        compare(q, k, v, mask=M.Causal())
    # The detector prints every race (its flag only survives the last kernel of the program).
    assert "RACE DETECTED" not in capfd.readouterr().out
    assert not _interpret.races_found()


# ----------------------------------------------------------------------------- metadata and dispatch


def test_step_lists_compact_non_empty_blocks_first():
    E, P, F = M.EMPTY, M.PARTIAL, M.FULL
    cls = jnp.array([[F, E, P, E], [E, E, E, E], [P, F, F, P]], jnp.int32)
    steps = np.asarray(attention_pallas.step_lists(cls)).reshape(3, 4)
    block, kind = steps >> 2, steps & 3
    np.testing.assert_array_equal(block, [[0, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(kind, [[F, P, E, E], [E, E, E, E], [P, F, F, P]])
    chunks = jnp.array([[F, F, P, E], [E, E, E, E]], jnp.int32)
    np.testing.assert_array_equal(attention_pallas.block_kinds(chunks, 2), [[F, P], [E, E]])


def test_registered_for_tpu_only_and_explained():
    impls = _registry.get_family("attention").implementations
    assert impls["pallas_tpu"].backend == "tpu" and impls["pallas_tpu"].rank < impls["xla"].rank
    q, k, v = qkv(0, 1, 96, 96, 4, 2, 16)
    text = ops.explain(ops.attention, q, k, v, mask=M.Causal())
    assert "skip pallas_tpu: no conformance evidence for platform 'cpu'" in text and "run  xla" in text
    text = ops.explain(ops.attention, q, k, v, mask=M.Causal(), impl="pallas_tpu")
    assert "run  pallas_tpu" in text and "block_q=32 x 2 heads" in text and "block_kv=64" in text


def test_supports_refuses_with_reasons():
    fam = ops.get_family("attention")
    q, k, v = qkv(0, 1, 96, 96, 2, 2, 8)
    explicit = MASKS["explicit"](96, 96)
    reason = attention_pallas.supports(fam.prepare(q, k, v, mask=explicit))
    assert reason and "Explicit" in reason and "gather" in reason
    reason = attention_pallas.supports(fam.prepare(q[:, :8], k, v, mask=M.Causal()))
    assert reason and "decode" in reason
    h = q.astype(jnp.float16)
    reason = attention_pallas.supports(fam.prepare(h, k.astype(h.dtype), v.astype(h.dtype)))
    assert reason and "float16" in reason
    with pytest.raises(NotImplementedError, match="Explicit"):
        ops.attention(q, k, v, mask=explicit, impl="pallas_tpu")
    assert attention_pallas.supports(fam.prepare(q, k, v, mask=M.Causal() | M.ChunkedCausal(8))) is None
