"""Conformance of every registered attention implementation against the reference.

Generated from the registry (tests/conformance/plan.py): every implementation runs in each numeric
mode its evidence names (``xla`` natively, ``pallas_tpu`` in the TPU interpreter with the interpreter's
small tiles). A call an implementation cannot serve is not skipped: the test asserts that naming the
implementation fails loudly with the reason ``supports`` gives, and checks nothing else.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.ops import _registry
from seqmix.ops import masks as M
from seqmix.ops.tpu import tiles
from seqmix.testing import assert_close, assert_not_close, tolerance_kind
from tests.conformance import plan
from tests.ops.attention_cases import MASKS, attention_vjp, packed_segments, qkv

CELLS = plan.cells("softmax", family_filter=lambda f: f.name == "attention")
MODE = dict((impl, mode) for _, impl, mode in CELLS)
assert len(MODE) == len(CELLS), "one numeric mode per attention implementation"
IMPLS = [pytest.param(impl, id=f"{impl}-{mode}", marks=[pytest.mark.interpret] if mode != "cpu" else [])
         for _, impl, mode in CELLS]


@pytest.fixture(autouse=True)
def _mode(request):
    """Run each case in its implementation's evidence mode (interpret: the interpreter's tile table)."""
    impl = request.node.callspec.params.get("impl") if hasattr(request.node, "callspec") else None
    if impl is None or MODE[impl] == "cpu":
        yield
        return
    with plan.mode_context(MODE[impl]), tiles.pinned(tiles.TABLE["interpret"]):
        yield


class Refused(Exception):
    """The implementation cannot serve the call, and failed loudly when named (asserted)."""


def _runnable(impl, *args, **kwargs) -> None:
    """Return if ``impl`` serves the call; otherwise assert that naming it raises with its reason and
    raise :class:`Refused` (the test then passes on that assertion alone: see ``_refusal_is_a_result``)."""
    fam = ops.get_family("attention")
    call = fam.prepare(*args, **kwargs)
    reason = fam.implementations[impl].supports(call)
    if reason is None:
        return
    with pytest.raises(NotImplementedError, match="no implementation can serve"):
        ops.attention(*args, impl=impl, **kwargs)
    raise Refused(reason)


def _refusal_is_a_result(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            test(*args, **kwargs)
        except Refused:
            pass
    return run


def compare(impl, q, k, v, *, kind=None, seed=1, diff_sink=False, **kwargs):
    """Forward (o, lse) and VJP (dq, dk, dv [, dsink]) of ``impl`` vs the reference."""
    _runnable(impl, q, k, v, **kwargs)
    kind = kind or tolerance_kind(q.dtype, "softmax")
    sink = kwargs.pop("sink_logits", None)
    b, tq, hq, _ = q.shape
    kd, kl = jax.random.split(jax.random.PRNGKey(seed))
    do = jax.random.normal(kd, (b, tq, hq, v.shape[-1]), jnp.float32).astype(q.dtype)
    dlse = jax.random.normal(kl, (b, hq, tq), jnp.float32)
    (o_ref, lse_ref), g_ref = attention_vjp("reference", q, k, v, sink, (do, dlse), **kwargs)
    (o, lse), g = attention_vjp(impl, q, k, v, sink, (do, dlse), **kwargs)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(o, o_ref, kind=kind, role="out", name="o")
    assert_close(lse, lse_ref, kind=kind, role="out", name="lse")
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], g_ref[:3]):
        assert jnp.all(jnp.isfinite(a)), name
        assert_close(a, r, kind=kind, role="grad", name=name)
    if sink is not None:
        assert_close(g[3], g_ref[3], kind=kind, role="gate", name="dsink")
    return o, lse


# An interpreted kernel checks every mask in its own tests (tests/kernels/); here the default run keeps these
# two per interpreted implementation (a band and a composed mask) and leaves the rest to the slow run.
INTERPRET_DEFAULT_MASKS = ("causal", "composed")


def _impl_mask_params():
    out = []
    for p in IMPLS:
        impl = p.values[0]
        for mask_name in sorted(MASKS):
            slow = MODE[impl] != "cpu" and mask_name not in INTERPRET_DEFAULT_MASKS
            marks = list(p.marks) + ([pytest.mark.slow] if slow else [])
            out.append(pytest.param(impl, mask_name, marks=marks, id=f"{mask_name}-{p.id}"))
    return out


@pytest.mark.parametrize("impl, mask_name", _impl_mask_params())
@pytest.mark.parametrize("t", [pytest.param(37, marks=pytest.mark.slow), 75])  # 75: several blocks, a partial one
def test_masks_match_reference(impl, mask_name, t):
    q, k, v = qkv(0, 2, t, t, 4, 2, 16)
    compare(impl, q, k, v, mask=MASKS[mask_name](t, t), block_q=16, block_kv=32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_name", ["causal", "streaming", "prefix_lm", "chunked"])
def test_packed_documents_match_reference(impl, mask_name):
    t = 70
    q, k, v = qkv(1, 2, t, t, 2, 1, 8)
    seg = packed_segments(2, t, [1, 15, 16, 17])  # a length-1 doc and docs ending on/off blocks
    compare(impl, q, k, v, mask=MASKS[mask_name](t, t), segment_ids=seg, block_q=16, block_kv=16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
def test_gqa_and_mqa(impl, hq, hkv):
    q, k, v = qkv(2, 1, 40, 40, hq, hkv, 8, dv=12)
    compare(impl, q, k, v, mask=M.Causal(), block_q=16, block_kv=16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tq,s", [(1, 50), (9, 50), (50, 9)])
def test_cross_attention(impl, tq, s):
    q, k, v = qkv(3, 2, tq, s, 2, 2, 8)
    compare(impl, q, k, v, mask=M.Causal(), block_q=8, block_kv=16)
    compare(impl, q, k, v, block_q=8, block_kv=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_sink_logits_and_soft_cap(impl):
    q, k, v = qkv(4, 2, 33, 33, 4, 2, 8)
    sink = jnp.array([0.5, -2.0, 3.0, 0.0])
    o, _ = compare(impl, q, k, v, mask=M.LocalWindow(5), sink_logits=sink, soft_cap=2.0, block_q=16, block_kv=16)
    plain = ops.attention(q, k, v, mask=M.LocalWindow(5), impl=impl, block_q=16, block_kv=16)
    assert_not_close(o, plain, name="sink logits + soft cap have an effect")


@pytest.mark.parametrize("impl", IMPLS)
def test_sink_logit_to_minus_infinity_is_no_sink(impl):
    q, k, v = qkv(5, 1, 20, 20, 2, 2, 8)
    _runnable(impl, q, k, v, mask=M.Causal())
    with_sink = ops.attention(q, k, v, mask=M.Causal(), sink_logits=jnp.full((2,), -1e30), impl=impl)
    assert_close(with_sink, ops.attention(q, k, v, mask=M.Causal(), impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    q, k, v = qkv(6, 2, 75, 75, 4, 2, 32, dtype=jnp.bfloat16)
    compare(impl, q, k, v, mask=M.Causal(), segment_ids=packed_segments(2, 75, [30]),
            sink_logits=jnp.zeros((4,), jnp.bfloat16), block_q=32, block_kv=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_with_finite_grads(impl):
    # Queries of segment 7 have no key of their segment; window rows before any key are empty too.
    q, k, v = qkv(7, 2, 12, 30, 2, 1, 8)
    q_seg = jnp.array([[0] * 6 + [7] * 6, [1] * 12])
    kv_seg = jnp.array([[0] * 30, [1] * 30])
    o, lse = compare(impl, q, k, v, segment_ids=(q_seg, kv_seg), block_q=8, block_kv=16)
    assert jnp.all(o[0, 6:] == 0) and jnp.all(jnp.isneginf(lse[0, :, 6:]))
    sink = jnp.array([0.3, -0.7])
    o, lse = compare(impl, q, k, v, segment_ids=(q_seg, kv_seg), sink_logits=sink, block_q=8, block_kv=16)
    assert jnp.all(o[0, 6:] == 0)
    np.testing.assert_allclose(lse[0, :, 6:], jnp.broadcast_to(sink[:, None], (2, 6)), rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_per_document(impl):
    t, lengths = 48, [5, 16, 27]
    q, k, v = qkv(8, 1, t, t, 2, 2, 8)
    seg = packed_segments(1, t, lengths)
    _runnable(impl, q, k, v, mask=M.streaming(6, 2), segment_ids=seg, block_q=16, block_kv=16)
    packed = ops.attention(q, k, v, mask=M.streaming(6, 2), segment_ids=seg, impl=impl, block_q=16, block_kv=16)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = ops.attention(q[:, sl], k[:, sl], v[:, sl], mask=M.streaming(6, 2), impl=(impl, "xla"))
        assert_close(packed[:, sl], alone, name=f"doc at {start}")
        start += n


@pytest.mark.parametrize("impl", IMPLS)
def test_features_have_effect(impl):
    q, k, v = qkv(9, 1, 40, 40, 2, 2, 8)
    _runnable(impl, q, k, v, mask=M.Causal())
    base = ops.attention(q, k, v, mask=M.Causal(), impl=impl)
    for mask in (M.LocalWindow(4), M.ChunkedCausal(8), M.PrefixLM(20), M.streaming(4, 2)):
        assert_not_close(ops.attention(q, k, v, mask=mask, impl=impl), base, name=repr(mask))
    assert_not_close(ops.attention(q, k, v, mask=M.Causal(), soft_cap=0.5, impl=impl), base, name="soft cap")


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    q, k, v = qkv(10, 1, 40, 40, 2, 2, 8)
    _runnable(impl, q, k, v, mask=M.Causal())
    f = jax.jit(lambda q, k, v: jax.grad(lambda q: ops.attention(q, k, v, mask=M.Causal(), impl=impl).sum())(q))
    a, b = f(q, k, v), f(q, k, v)
    assert bool(jnp.all(a == b))


def test_xla_memory_grows_linearly():
    """The chunked form never materializes [T, S] scores, forward or backward."""
    def temp_bytes(impl, t):
        q, k, v = (jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32),) * 3
        f = jax.jit(jax.grad(lambda q, k, v: ops.attention(q, k, v, mask=M.Causal(), impl=impl).sum(), argnums=(0, 1, 2)))
        return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    t = 4096
    scores = t * t * 4
    assert temp_bytes("xla", t) < scores / 8
    assert temp_bytes("reference", t) > scores  # the reference does materialize them
    assert temp_bytes("xla", 2 * t) < 3 * temp_bytes("xla", t)


def test_explain_names_choice_and_skips():
    q, k, v = qkv(0, 1, 8, 8, 2, 2, 8)
    text = ops.explain(ops.attention, q, k, v, mask=M.Causal())
    assert "run  xla" in text and "block_q" in text
    text = ops.explain(ops.attention, q, k, v, impl=("reference",))
    assert "run  reference" in text


def test_named_impl_that_cannot_serve_fails_loudly():
    fam = ops.get_family("attention")
    fam.implementations["_never"] = _registry.Implementation(
        "_never", lambda c: None, 0, supports=lambda c: "never serves", auto=False)
    try:
        q, k, v = qkv(0, 1, 8, 8, 2, 2, 8)
        with pytest.raises(NotImplementedError, match="never serves"):
            ops.attention(q, k, v, impl="_never")
        out = ops.attention(q, k, v, impl=("_never", "xla"))  # a tuple falls through in order
        assert_close(out, ops.attention(q, k, v, impl="reference"))
        with pytest.raises(ValueError, match="unknown impl"):
            ops.attention(q, k, v, impl="nope")
    finally:
        del fam.implementations["_never"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=(2, 8, 3, 8), k=(2, 8, 2, 8)), "must divide q heads"),
    (dict(q=(2, 8, 4, 8), k=(2, 8, 2, 6)), "head_dim"),
    (dict(q=(2, 8, 4), k=(2, 8, 2, 8)), "rank 4"),
    (dict(q=(1, 8, 2, 8), k=(2, 8, 2, 8)), "batch"),
])
def test_bad_shapes(kwargs, match):
    q = jnp.zeros(kwargs["q"])
    k = jnp.zeros(kwargs["k"])
    with pytest.raises(ValueError, match=match):
        ops.attention(q, k, k)


def test_bad_arguments():
    q, k, v = qkv(0, 2, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="dtype"):
        ops.attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="floating"):
        ops.attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with pytest.raises(ValueError, match="mask"):
        ops.attention(q, k, v, mask="causal")
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="sink_logits"):
        ops.attention(q, k, v, sink_logits=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="soft_cap"):
        ops.attention(q, k, v, soft_cap=-1.0)
    with pytest.raises(ValueError, match="block_q"):
        ops.attention(q, k, v, block_q=12)
    with pytest.raises(ValueError, match="window"):
        M.LocalWindow(0)
    with pytest.raises(ValueError, match="compose"):
        M.Causal() & "x"


for _name, _fn in list(globals().items()):
    if _name.startswith("test_") and callable(_fn):
        globals()[_name] = _refusal_is_a_result(_fn)
