"""Pallas TPU recurrent kernels in interpret mode on CPU, against each family's reference (FAMILIES.md §5.4).

Forward (o, final_state) and VJP (dq, dk, dv, dg / dβ, d initial_state; random cotangents on o *and*
final_state) for the six recurrent families at small shapes: T = 75 with 32-row chunks (three chunks, a
partial tail), packed documents (a length-1 document, documents ending on and just off chunk boundaries),
an initial state, and per-head gate regimes: head 0 moderate gates, head 1 extreme ones (log decays down to
−500, some exactly 0). One bf16 case per kernel family with the recurrent bf16 tolerances. Interpret mode
is slow on CPU (every kernel body is traced and simulated), so each case covers several features at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _interpret
from seqmix import ops
from seqmix.ops import _registry, recurrent_pallas
from seqmix.testing import assert_close

pytestmark = pytest.mark.interpret

T, CHUNK, DK, DV = 75, 32, 16, 16
SEGMENTS = [1, 31, 32, 5]  # ends at 1, 32 (a chunk boundary), 64 (boundary), 69; then 6 tokens


@pytest.fixture(autouse=True)
def _interpret_mode():
    with _interpret.force("tpu"):
        yield


def _segments(b, t, lengths):
    ids = np.zeros((b, t), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        ids[:, start:start + n] = i
        start += n
    ids[:, start:] = len(lengths)
    return jnp.asarray(ids)


def _gates(key, shape):
    """Head 0: logsigmoid(x + 2) (moderate); head 1: logsigmoid(x)/0.01 (extreme), a fifth set to 0."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, jnp.float32)
    mild = jax.nn.log_sigmoid(x + 2.0)
    extreme = jax.nn.log_sigmoid(x) / 0.01
    extreme = jnp.where(jax.random.uniform(k2, shape) < 0.2, 0.0, extreme)
    head = jnp.arange(shape[2]).reshape((1, 1, -1) + (1,) * (len(shape) - 3))
    return jnp.where(head == 0, mild, extreme)


def _inputs(family, dtype, seed=0, b=1, h=2):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, T, h, DK), jnp.float32)
    k = jax.random.normal(ks[1], (b, T, h, DK), jnp.float32)
    v = jax.random.normal(ks[2], (b, T, h, DV), jnp.float32)
    if "delta" in family:  # L2-normalized q, k (FAMILIES.md §5.1 rule 5)
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    h0 = 0.5 * jax.random.normal(ks[3], (b, h, DK, DV), jnp.float32)
    extra = {}
    if family == "retention":
        extra["decay"] = jnp.array([-0.05, -3.0], jnp.float32)[:h]
    elif family in ("simple_gla", "gated_delta_rule"):
        extra["g"] = _gates(ks[4], (b, T, h))
    elif family == "gla":
        extra["g"] = _gates(ks[4], (b, T, h, DK))
    if "delta" in family:
        extra["beta"] = jax.nn.sigmoid(2.0 * jax.random.normal(ks[5], (b, T, h)))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), h0, extra


OPS = {
    "linear_attention": (ops.linear_attention, ()),
    "retention": (ops.retention, ()),
    "simple_gla": (ops.simple_gla, ("g",)),
    "gla": (ops.gla, ("g",)),
    "delta_rule": (ops.delta_rule, ("beta",)),
    "gated_delta_rule": (ops.gated_delta_rule, ("g", "beta")),
}


def _run(family, impl, q, k, v, h0, extra, seg, do, dsf, kwargs):
    op, positional = OPS[family]
    pos = {n: extra[n] for n in positional}
    static = {n: x for n, x in extra.items() if n not in positional}

    @jax.jit
    def go(q, k, v, h0, pos, do, dsf):
        def f(q, k, v, h0, pos):
            return op(q, k, v, *[pos[n] for n in positional], initial_state=h0, return_state=True,
                      segment_ids=seg, chunk_size=CHUNK, impl=impl, **static, **kwargs)
        out, vjp = jax.vjp(f, q, k, v, h0, pos)
        return out, vjp((do, dsf))

    return go(q, k, v, h0, pos, do, dsf)


def compare(family, dtype=jnp.float32, kind="fp32", seed=0, **kwargs):
    q, k, v, h0, extra = _inputs(family, dtype, seed)
    b = q.shape[0]
    seg = _segments(b, T, SEGMENTS)
    call = ops.get_family(family).prepare(q, k, v, *[extra[n] for n in OPS[family][1]], segment_ids=seg,
                                          chunk_size=CHUNK, **{n: x for n, x in extra.items()
                                                               if n not in OPS[family][1]}, **kwargs)
    assert recurrent_pallas.IMPLEMENTATIONS[family].supports(call) is None
    kd, ks_ = jax.random.split(jax.random.PRNGKey(seed + 7))
    dv_out = v.shape[-1]
    do = jax.random.normal(kd, (b, T, q.shape[2], dv_out), jnp.float32).astype(dtype)
    dsf = jax.random.normal(ks_, h0.shape[:3] + (h0.shape[3] + (1 if kwargs.get("normalize") else 0),),
                            jnp.float32)
    if kwargs.get("normalize"):
        h0 = jnp.abs(jnp.concatenate([h0, jnp.ones(h0.shape[:3] + (1,))], axis=-1))
    (o, s), grads = _run(family, "pallas_tpu", q, k, v, h0, extra, seg, do, dsf, kwargs)
    (o_r, s_r), grads_r = _run(family, "reference", q, k, v, h0, extra, seg, do, dsf, kwargs)
    assert o.dtype == q.dtype and s.dtype == jnp.float32
    assert_close(o, o_r, kind=kind, role="out", name="o")
    assert_close(s, s_r, kind=kind, role="out", name="final_state")
    for name, a, r in zip(("dq", "dk", "dv", "dh0"), grads[:4], grads_r[:4]):
        assert a.dtype == r.dtype, name
        assert_close(a, r, kind=kind, role="grad", name=name)
    for name in grads[4]:
        assert_close(grads[4][name], grads_r[4][name], kind=kind, role="gate", name=f"d{name}")


@pytest.mark.parametrize("family", list(OPS))
def test_matches_reference_fp32(family):
    compare(family)


@pytest.mark.parametrize("family", ["gla", "gated_delta_rule"])
def test_matches_reference_bf16(family):
    compare(family, jnp.bfloat16, kind="recurrent_bf16", seed=3)


def test_linear_attention_normalized():
    compare("linear_attention", feature_map="elu", normalize=True, seed=5)


# ----------------------------------------------------------------------------- registry (no kernel runs)


def test_registered_for_every_family():
    for family in OPS:
        impl = _registry.get_family(family).implementations["pallas_tpu"]
        assert impl.platforms == ("tpu",) and impl.rank == 10


def test_supports_and_describe():
    q, k, v, h0, extra = _inputs("gla", jnp.float32)
    call = ops.get_family("gla").prepare(q, k, v, extra["g"], chunk_size=64)
    impl = recurrent_pallas.IMPLEMENTATIONS["gla"]
    assert impl.supports(call) is None
    assert "chunk=64" in impl.describe(call) and "sub_chunk=16" in impl.describe(call)
    bad = ops.get_family("gla").prepare(q, k, v, extra["g"], chunk_size=40)
    assert "multiple of 16" in impl.supports(bad)
    dq, dk_, dv_, _, ex = _inputs("delta_rule", jnp.float16)
    call = ops.get_family("delta_rule").prepare(dq, dk_, dv_, ex["beta"], chunk_size=48)
    reason = recurrent_pallas.IMPLEMENTATIONS["delta_rule"].supports(call)
    assert "float16" in reason
    call = ops.get_family("delta_rule").prepare(dq.astype(jnp.float32), dk_.astype(jnp.float32),
                                                dv_.astype(jnp.float32), ex["beta"], chunk_size=48)
    assert "power of two" in recurrent_pallas.IMPLEMENTATIONS["delta_rule"].supports(call)
    # automatic dispatch on CPU never picks the TPU kernel
    assert "skip pallas_tpu" in ops.explain(ops.gla, q, k, v, extra["g"])
