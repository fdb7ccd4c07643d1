"""``attention`` and ``neighborhood_attention`` through ``impl="pallas_gpu"`` (the Mosaic GPU kernels, run in
the Mosaic GPU interpreter on CPU) against the reference: the registry's glue (padding, coordinates, block
metadata from ``seqmix.ops.block_meta``, GQA layout, lse) on top of the kernels that
``tests/kernels/test_flash_attention_gpu.py`` checks directly.

Forward (o, lse) and VJP (dq, dk, dv, d sink) at lengths that are not multiples of the 64-row interpreter
blocks, with seqmix masks (causal, sliding window, streaming sinks + window, prefix-LM), packed documents,
GQA, sink logits and soft cap, fp32 and bf16; and a 2-D neighborhood. ``supports`` names what the kernels
refuse.
"""

import jax
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.ops import masks as M
from seqmix.ops.gpu import attention as gpu_attention
from seqmix.testing import assert_close, tolerance_kind
from tests.kernels import gpu_cases

pytestmark = pytest.mark.interpret

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu",
                            reason="Mosaic GPU Pallas is not importable in this jax (needs absl-py)")


@pytest.fixture(autouse=True)
def _fast_interpreter():
    with gpu_cases.fast_interpreter():
        yield


def _inputs(b, t, hq, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, t), jnp.float32)
    sink = jax.random.normal(ks[5], (hq,), jnp.float32)
    return q, k, v, do, dlse, sink


def _run(op, impl, q, k, v, do, dlse, kw, sink=None):
    @jax.jit
    def go(q, k, v, sink):
        def f(q, k, v, sink):
            return op(q, k, v, return_lse=True, impl=impl, **kw, **({} if sink is None else {"sink_logits": sink}))
        out, vjp = jax.vjp(f, q, k, v, sink)
        return out, vjp((do, dlse))

    return go(q, k, v, sink)


def _compare(op, q, k, v, do, dlse, kw, sink=None):
    (o, lse), grads = _run(op, "pallas_gpu", q, k, v, do, dlse, kw, sink)
    (o_ref, lse_ref), grads_ref = _run(op, "reference", q, k, v, do, dlse, kw, sink)
    kind = tolerance_kind(q.dtype, "softmax")
    assert o.dtype == q.dtype
    assert_close(o, o_ref, kind=kind, role="out", name="o")
    assert_close(lse, lse_ref, kind=kind, role="out", name="lse")
    names = ("dq", "dk", "dv") + (("dsink",) if sink is not None else ())
    for n, a, r in zip(names, grads, grads_ref):
        assert_close(a, r, kind=kind, role="grad", name=n)


CASES = {  # B, T, Hq, Hkv, dtype, mask, segments, sinks, soft cap
    "causal_gqa_ragged": (1, 100, 4, 2, jnp.float32, M.Causal(), None, False, None),
    "window_packed_bf16": (2, 90, 2, 1, jnp.bfloat16, M.LocalWindow(24), (30, 60), False, None),
    "streaming_sinks_softcap": (1, 130, 2, 2, jnp.float32, M.streaming(32, 4), None, True, 5.0),
    "prefix_lm": (1, 70, 2, 1, jnp.float32, M.PrefixLM(20), None, False, None),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "prefix_lm" else n for n in CASES])
def test_attention_matches_reference(name):
    b, t, hq, hkv, dtype, mask, docs, sinks, cap = CASES[name]
    q, k, v, do, dlse, sink = _inputs(b, t, hq, hkv, 64, dtype)
    kw = {"mask": mask}
    if docs:
        kw["segment_ids"] = jnp.repeat(jnp.asarray([[0, 1]] * b), jnp.asarray(docs), axis=1,
                                       total_repeat_length=t)
    if cap is not None:
        kw["soft_cap"] = cap
    call = ops.get_family("attention").prepare(q, k, v, **kw)
    assert gpu_attention.supports(call) is None, gpu_attention.supports(call)
    _compare(ops.attention, q, k, v, do, dlse, kw, sink if sinks else None)


def test_neighborhood_2d_matches_reference():
    """A 9×9 grid (81 tokens: not a block multiple), kernel 3, dilation (1, 2): neighborhood attention's
    pallas_gpu is attention's on the flattened grid."""
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    x = [jax.random.normal(kk, (1, 9, 9, 2, 64), jnp.float32) for kk in ks]
    kw = {"kernel_size": 3, "dilation": (1, 2)}

    def loss(impl):
        def f(q, k, v):
            o, lse = ops.neighborhood_attention(q, k, v, return_lse=True, impl=impl, **kw)
            return (o * jnp.cos(o)).sum() + (lse * 0.3).sum(), (o, lse)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*x)

    (_, (o, lse)), grads = loss("pallas_gpu")
    (_, (o_ref, lse_ref)), grads_ref = loss("reference")
    assert_close(o, o_ref, kind="fp32", role="out", name="o")
    assert_close(lse, lse_ref, kind="fp32", role="out", name="lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(a, r, kind="fp32", role="grad", name=n)


def test_supports_names_what_the_kernels_refuse():
    prepare = ops.get_family("attention").prepare
    q = jnp.zeros((1, 64, 2, 32), jnp.float32)
    assert "head_dim 32" in gpu_attention.supports(prepare(q, q, q))
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    assert "Explicit" in gpu_attention.supports(prepare(q, q, q, mask=M.Explicit(jnp.ones((64, 64), bool))))
    assert gpu_attention.supports(prepare(q, q, q, mask=M.Causal())) is None
    with pytest.raises(NotImplementedError, match="no implementation can serve"):
        ops.attention(q[..., :32], q[..., :32], q[..., :32], impl="pallas_gpu")
