"""Mosaic GPU state pass of the (gated) delta rule (``pallas_kernels.gpu.delta_rule``) in the Mosaic GPU
interpreter on CPU.

Two levels: the raw kernel (``state_pass``: forward and every operand's gradient, decay factors in (0, 1)
so the chunk-to-chunk decay and its gradient matter) against a plain-jnp scan of the same equations; and
the ops (``delta_rule`` / ``gated_delta_rule`` with ``impl="pallas_gpu"``) against the token-loop
references, with decay across chunk boundaries (the registry conformance suite's packed documents reset
the state in every chunk), hard gates, lengths that are not chunk multiples and Dv over two tiles.
Tolerances: ``seqmix.testing`` (fp32 / recurrent_bf16). The production head size is ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.testing import assert_close, tolerance_kind
from tests.kernels.gpu_cases import interpreter_problem, kernel_session

pytestmark = pytest.mark.interpret

_PROBLEM = interpreter_problem()
if _PROBLEM is not None:
    pytest.skip(_PROBLEM, allow_module_level=True)

from pallas_kernels.gpu import delta_rule as dr  # noqa: E402
from pallas_kernels.gpu import flash_attention as fa  # noqa: E402

HI = jax.lax.Precision.HIGHEST
OPERANDS = ("qg", "p", "kd", "u", "w", "a", "h0")


@pytest.fixture(autouse=True)
def _interpreter():
    with kernel_session():
        yield


def _cfg(dtype, tiles=dr.INTERPRET_TILES, races=False):
    return dr.DeltaGpuConfig(dtype=jnp.dtype(dtype).name, tiles=tiles, out_dtype="float32",
                             interpret=fa.interpret_params(detect_races=races))


def scan_state_pass(qg, p, kd, u, w, a, h0, chunk):
    """The state pass as a plain fp32 ``lax.scan`` over chunks (the kernel's equations)."""
    b, h, tp, _ = qg.shape
    n = tp // chunk
    split = lambda x: jnp.moveaxis(x.reshape(b, h, n, chunk, -1), 2, 0)  # noqa: E731

    def body(s, x):
        qg_, p_, kd_, u_, w_, a_ = x
        vn = u_ - jnp.einsum("bhcd,bhdv->bhcv", w_, s, precision=HI)
        o = (jnp.einsum("bhcd,bhdv->bhcv", qg_, s, precision=HI)
             + jnp.einsum("bhij,bhjv->bhiv", p_, vn, precision=HI))
        return a_[..., None] * s + jnp.einsum("bhcd,bhcv->bhdv", kd_, vn, precision=HI), o

    sf, o = jax.lax.scan(body, h0, (*map(split, (qg, p, kd, u, w)), jnp.moveaxis(a, 2, 0)))
    return jnp.moveaxis(o, 0, 2).reshape(b, h, tp, -1), sf


def _operands(seed, b, h, n, dk, dv, chunk=64):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    tp = n * chunk
    rnd = lambda i, shape, s=0.3: s * jax.random.normal(ks[i], shape, jnp.float32)  # noqa: E731
    args = (rnd(0, (b, h, tp, dk)), rnd(1, (b, h, tp, chunk)), rnd(2, (b, h, tp, dk)), rnd(3, (b, h, tp, dv)),
            rnd(4, (b, h, tp, dk)), jax.random.uniform(ks[5], (b, h, n, dk), jnp.float32, 0.2, 1.0),
            rnd(6, (b, h, dk, dv)))
    cts = (rnd(7, (b, h, tp, dv), 1.0), rnd(8, (b, h, dk, dv), 1.0))
    return args, cts


def _check_state_pass(dtype, seed, b, h, n, dk, dv, tiles=dr.INTERPRET_TILES, races=False):
    args, cts = _operands(seed, b, h, n, dk, dv)
    if jnp.dtype(dtype) != jnp.float32:  # the reference sees the operands the kernel multiplies
        args = tuple(x.astype(dtype).astype(jnp.float32) if i < 5 else x for i, x in enumerate(args))
    cfg = _cfg(dtype, tiles=tiles, races=races)
    out, vjp = jax.vjp(jax.jit(lambda *x: dr.state_pass(cfg, *x)), *args)  # jitted: one program each
    ref, rvjp = jax.vjp(jax.jit(lambda *x: scan_state_pass(*x, chunk=64)), *args)
    kind = tolerance_kind(dtype, "recurrent")
    assert_close(out[0], ref[0], kind=kind, role="out", name="o")
    assert_close(out[1], ref[1], kind=kind, role="out", name="final_state")
    for name, got, want in zip(OPERANDS, vjp(cts), rvjp(cts)):
        assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32, name
        assert_close(got, want, kind=kind, role="grad", name="d" + name)


def test_state_pass_fp32_three_chunks_two_dv_tiles():
    _check_state_pass(jnp.float32, 0, 1, 2, 3, 64, 128)


@pytest.mark.parametrize("stages", [1, 3])
def test_state_pass_input_ring_stages(stages):
    """The chunk loop's input ring at depths 1 (no prefetch) and 3 (wrapping around over 5 chunks), forward
    and reverse, under the race detector."""
    _check_state_pass(jnp.float32, 2, 1, 1, 5, 64, 64, tiles=dr.GLATiles(64, 64, stages), races=True)


@pytest.mark.slow  # the registry conformance suite runs both delta families in bf16 in the default run
def test_state_pass_bf16():
    _check_state_pass(jnp.bfloat16, 1, 2, 1, 2, 64, 64)


# ----------------------------------------------------------------------------- the ops


def _op_inputs(b, t, h, dk, dv, dtype, seed, gated=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731 - the layers' L2 norm
    q = unit(jax.random.normal(ks[0], (b, t, h, dk))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (b, t, h, dk))).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0) if gated else None
    h0 = 0.3 * jax.random.normal(ks[5], (b, h, dk, dv))
    do = jax.random.normal(ks[6], (b, t, h, dv)).astype(dtype)
    dsf = jax.random.normal(ks[7], (b, h, dk, dv))
    return q, k, v, beta, g, h0, do, dsf


def _check_op(dtype, b, t, h, dk, dv, seed, gated=True, g=None, seg=None):
    q, k, v, beta, g0, h0, do, dsf = _op_inputs(b, t, h, dk, dv, dtype, seed, gated)
    g = g0 if g is None else g

    def run(impl):
        def f(q, k, v, beta, g, h0):
            if gated:
                return ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, return_state=True,
                                            segment_ids=seg, impl=impl)
            return ops.delta_rule(q, k, v, beta, initial_state=h0, return_state=True, segment_ids=seg, impl=impl)
        return jax.vjp(jax.jit(f), q, k, v, beta, g, h0)  # jitted: one program, not one compile per primitive

    (out, vjp), (ref, rvjp) = run("pallas_gpu"), run("reference")
    kind = tolerance_kind(dtype, "recurrent")
    assert out[0].dtype == ref[0].dtype == jnp.dtype(dtype)
    assert_close(out[0], ref[0], kind=kind, role="out", name="o")
    assert_close(out[1], ref[1], kind=kind, role="out", name="final_state")
    names = ("dq", "dk", "dv", "dbeta", "dg", "dh0")
    for name, got, want in zip(names, vjp((do, dsf)), rvjp((do, dsf))):
        if name == "dg" and not gated:
            continue
        role = "gate" if name in ("dbeta", "dg") else "grad"
        assert_close(got, want, kind=kind, role=role, name=name)


@pytest.mark.slow  # by default the registry suite's last document crosses the kernel's chunk boundary at 64
def test_gated_delta_rule_decay_across_chunks_fp32():
    """T = 150 (three 64-token chunks, the last partial), no documents: the state decays from chunk to
    chunk, so the gate gradient runs through the kernel's ``da``; Dv = 128 over two tiles."""
    _check_op(jnp.float32, 1, 150, 2, 64, 128, seed=0)


@pytest.mark.slow  # the registry conformance suite covers delta_rule with documents in the default run
def test_delta_rule_documents_fp32():
    """DeltaNet (no gate) with documents ending inside a chunk and on a chunk boundary."""
    seg = jnp.asarray(np.repeat([0, 1, 2], [40, 24, 36])[None])
    _check_op(jnp.float32, 1, 100, 2, 64, 64, seed=1, gated=False, seg=seg)


@pytest.mark.slow  # the conformance suite's fp32 "stress" gates (down to -500, exact zeros) run by default
def test_gated_delta_rule_hard_gates_fp32():
    """g = -inf (a full forget), -1e30, exact zeros and gates near 0."""
    b, t, h, d = 1, 128, 2, 64
    g = np.asarray(_op_inputs(b, t, h, d, d, jnp.float32, seed=2)[4]).copy()
    g[0, 5, 0] = -np.inf
    g[0, 70, 1] = -np.inf
    g[0, 20, :] = -1e30
    g[0, 41:60, :] = 0.0
    g[0, 90:100, :] = -1e-6
    _check_op(jnp.float32, b, t, h, d, d, seed=2, g=jnp.asarray(g))


@pytest.mark.slow  # the registry conformance suite runs gated_delta_rule in bf16 in the default run
def test_gated_delta_rule_bf16():
    _check_op(jnp.bfloat16, 1, 100, 2, 64, 64, seed=3)


def test_refusals_and_shared_memory():
    args, _ = _operands(0, 1, 1, 1, 64, 64)
    with pytest.raises(ValueError, match="float32"):
        dr.state_pass(_cfg(jnp.bfloat16), args[0].astype(jnp.bfloat16), *args[1:])
    with pytest.raises(ValueError, match="multiple of the chunk"):
        dr.state_pass(_cfg(jnp.float32), *(x[:, :, :32] if i < 5 else x for i, x in enumerate(args)))
    with pytest.raises(ValueError, match=r"a must be"):
        dr.state_pass(_cfg(jnp.float32), *args[:5], args[5][..., :32], args[6])
    for dtype in (jnp.bfloat16, jnp.float16):
        sizes = dr.smem_bytes(dr.H100_TILES, 128, 128, dtype, out_dtype=jnp.float32)
        assert max(sizes.values()) <= fa.MAX_SMEM_BYTES, sizes


def test_race_detector_clean():
    """Forward and backward under the interpreter's race detector (jax 0.10's ``races_found`` flag)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:  # pragma: no cover - another jax
        pytest.skip("the interpreter's race-detection state is not reachable in this jax")
    args, cts = _operands(4, 1, 1, 2, 64, 64)
    cfg = _cfg(jnp.bfloat16, races=True)
    _, vjp = jax.vjp(lambda *x: dr.state_pass(cfg, *x), *args)
    jax.block_until_ready(vjp(cts))
    races = getattr(gpu_callbacks, "_races", None)
    if races is None:
        pytest.skip("the interpreter kept no race-detection state")
    assert not races.races_found


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_delta_rule_production_head_slow(dtype):
    """Dk = Dv = 128 (the production head size), 300 tokens, documents."""
    seg = jnp.asarray(np.repeat([0, 1, 2], [100, 128, 72])[None])
    _check_op(dtype, 1, 300, 1, 128, 128, seed=5, seg=seg)
