"""Mosaic GPU chunked gated linear attention (``pallas_kernels.gpu.gated_linear``) in the Mosaic GPU
interpreter on CPU, against the seqmix token-loop references (``impl="reference"``).

Forward (o, final state) and VJP (dq, dk, dv, dg, d initial_state; random cotangents on o and the final
state) at small shapes with the interpreter tiles (64-token chunks, 64-column Dv tiles): lengths that are
not chunk multiples (the wrapper pads), packed documents (segment resets inside and on chunk boundaries),
an initial state, Dv split over two tiles, hard gates (``-inf``, ``-1e30``, exact zeros and gates near 0),
no decay (``linear_attention``), constant decay (``retention``), per-channel gates (``gla``: the anchored
kernel, and the exact jnp path the wrapper takes when a chunk's per-channel span exceeds ``ANCHOR_SPAN``),
fp32 and bf16, with the race detector on.
Tolerances: ``seqmix.testing`` (fp32 / recurrent_bf16). Larger sweeps are ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.testing import assert_close, assert_finite, tolerance_kind
from tests.kernels.gpu_cases import interpreter_problem, kernel_session

pytestmark = pytest.mark.interpret


_PROBLEM = interpreter_problem()
if _PROBLEM is not None:
    pytest.skip(_PROBLEM, allow_module_level=True)

from pallas_kernels.gpu import gated_linear as gl  # noqa: E402



@pytest.fixture(autouse=True)
def _interpreter():
    with kernel_session():
        yield


def _cfg(dk, gate="scalar", gate_grad=True, tiles=gl.INTERPRET_TILES, races=True):
    return gl.GLAGpuConfig(scale=dk ** -0.5, gate=gate, gate_grad=gate_grad, tiles=tiles,
                           interpret=gl.interpret_params(detect_races=races))


def _resets(seg):
    seg = jnp.asarray(seg)
    return jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def _segments(b, t, lens):
    """int32 [B, T] document ids from per-row document lengths (the last one runs to T)."""
    seg = np.zeros((b, t), np.int32)
    for bi, row in enumerate(lens):
        seg[bi] = np.repeat(np.arange(len(row) + 1), list(row) + [t - sum(row)])[:t]
    return jnp.asarray(seg)


def _inputs(b, t, h, dk, dv, dtype, seed=0, gate="scalar"):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
    g = None
    if gate == "scalar":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h), jnp.float32) + 2.0)
    elif gate == "channel":  # typical GLA gates: logsigmoid(normal + 4) per channel
        g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk), jnp.float32) + 4.0)
    h0 = 0.1 * jax.random.normal(ks[4], (b, h, dk, dv), jnp.float32)
    do = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32).astype(dtype)
    dsf = jax.random.normal(ks[6], (b, h, dk, dv), jnp.float32)
    return q, k, v, g, h0, do, dsf


def _check_against(kernel_fn, ref_fn, args, cots, dtype, names):
    """Forward outputs and every input gradient of ``kernel_fn`` vs ``ref_fn`` (same signature)."""
    out, vjp = jax.vjp(jax.jit(kernel_fn), *args)  # jitted: one program, not one compile per primitive
    ref, rvjp = jax.vjp(jax.jit(ref_fn), *args)
    kind = tolerance_kind(dtype, "recurrent")
    assert out[0].shape == ref[0].shape and out[0].dtype == ref[0].dtype
    assert_close(out[0], ref[0], kind=kind, role="out", name="o")
    assert_close(out[1], ref[1], kind=kind, role="out", name="final_state")
    grads, rgrads = vjp(cots), rvjp(cots)
    for name, got, want in zip(names, grads, rgrads):
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        role = "gate" if name == "dg" else "grad"
        assert_close(got, want, kind=kind, role=role, name=name)


def _simple_gla_case(b, t, h, dk, dv, dtype, seg=None, seed=0, g=None, tiles=gl.INTERPRET_TILES):
    q, k, v, g0, h0, do, dsf = _inputs(b, t, h, dk, dv, dtype, seed)
    g = g0 if g is None else g
    cfg = _cfg(dk, tiles=tiles)
    resets = None if seg is None else _resets(seg)

    def kernel_fn(q, k, v, g, h0):
        return gl.gated_linear_attention(cfg, q, k, v, g, h0, resets)

    def ref_fn(q, k, v, g, h0):
        return ops.simple_gla(q, k, v, g, initial_state=h0, return_state=True, segment_ids=seg,
                              impl="reference")

    _check_against(kernel_fn, ref_fn, (q, k, v, g, h0), (do, dsf), dtype, ["dq", "dk", "dv", "dg", "dh0"])


# ----------------------------------------------------------------------------- simple_gla


@pytest.mark.slow  # the registry conformance suite covers simple_gla fp32/bf16 in the default run
def test_simple_gla_fp32_segments_two_dv_tiles():
    """T = 150 (padded to 3 chunks), documents ending inside a chunk and exactly on a chunk boundary, a
    length-1 document, Dv = 128 over two Dv tiles, an initial state."""
    seg = _segments(2, 150, [(40, 1, 69), (64,)])
    _simple_gla_case(2, 150, 2, 64, 128, jnp.float32, seg=seg)


@pytest.mark.slow  # the registry conformance suite covers simple_gla fp32/bf16 in the default run
def test_simple_gla_bf16():
    seg = _segments(1, 100, [(30,)])
    _simple_gla_case(1, 100, 2, 64, 64, jnp.bfloat16, seg=seg, seed=1)


def test_simple_gla_hard_gates():
    """-inf (a hard reset), -1e30, -50, exact zeros (no decay) and gates near 0, fp32."""
    b, t, h, d = 1, 96, 2, 64
    g = np.asarray(_inputs(b, t, h, d, d, jnp.float32, seed=2)[3]).copy()
    g[0, 5, 0] = -np.inf
    g[0, 70, 1] = -np.inf
    g[0, 20, :] = -1e30
    g[0, 40, 0] = -50.0
    g[0, 41:60, :] = 0.0
    g[0, 60:70, :] = -1e-6
    g[0, 64, 0] = -np.inf  # a hard reset on a chunk's first token
    _simple_gla_case(b, t, h, d, d, jnp.float32, g=jnp.asarray(g), seed=2)


@pytest.mark.slow  # the registry conformance suite covers simple_gla fp32/bf16 in the default run
def test_simple_gla_strong_decay_fp32():
    """Gates logsigmoid(x)/0.1 (fast decay) with segments, fp32."""
    b, t, h, d = 1, 80, 1, 64
    x = jax.random.normal(jax.random.PRNGKey(5), (b, t, h))
    g = jax.nn.log_sigmoid(x) / 0.1
    _simple_gla_case(b, t, h, d, d, jnp.float32, seg=_segments(b, t, [(17, 47)]), g=g, seed=5)


@pytest.mark.slow  # the default run keeps the fp32 hard gates and the registry suite's bf16 cells
def test_simple_gla_strong_decay_bf16_matches_chunked_xla():
    """bf16 with gates logsigmoid(x)/0.1: o, final state, dq, dk, dv, dh0 against the reference; dg against
    the chunked XLA form (``impl="xla"``, the same closed-form gate gradient), because in bf16 the closed
    form itself misses the reference by rms ~0.11 on this input (cancellation of the final-state term
    through the reverse cumsum, _gated_chunk.py's documented limit): the kernel must not be worse."""
    b, t, h, d = 1, 80, 1, 64
    x = jax.random.normal(jax.random.PRNGKey(5), (b, t, h))
    g = jax.nn.log_sigmoid(x) / 0.1
    seg = _segments(b, t, [(17, 47)])
    q, k, v, _, h0, do, dsf = _inputs(b, t, h, d, d, jnp.bfloat16, seed=5)
    cfg = _cfg(d)
    resets = _resets(seg)

    def kernel_fn(q, k, v, g, h0):
        return gl.gated_linear_attention(cfg, q, k, v, g, h0, resets)

    def ref_fn(q, k, v, g, h0, impl="reference"):
        return ops.simple_gla(q, k, v, g, initial_state=h0, return_state=True, segment_ids=seg, impl=impl)

    args = (q, k, v, g, h0)
    out, vjp = jax.vjp(jax.jit(kernel_fn), *args)
    ref, rvjp = jax.vjp(jax.jit(ref_fn), *args)
    kind = "recurrent_bf16"
    assert_close(out[0], ref[0], kind=kind, name="o")
    assert_close(out[1], ref[1], kind=kind, name="final_state")
    grads, rgrads = vjp((do, dsf)), rvjp((do, dsf))
    for name, got, want in zip(["dq", "dk", "dv", "dg", "dh0"], grads, rgrads):
        if name != "dg":
            assert_close(got, want, kind=kind, role="grad", name=name)
    xla_dg = jax.vjp(jax.jit(lambda *a: ref_fn(*a, impl="xla")), *args)[1]((do, dsf))[3]
    assert_close(grads[3], xla_dg, kind=kind, role="gate", name="dg vs xla")


def test_forward_only_no_initial_state():
    """Without an initial state and without return_state's cotangent (o only)."""
    b, t, h, d = 1, 64, 1, 64
    q, k, v, g, _, do, _ = _inputs(b, t, h, d, d, jnp.float32, seed=3)
    cfg = _cfg(d)
    o, sf = gl.gated_linear_attention(cfg, q, k, v, g)
    ro, rsf = ops.simple_gla(q, k, v, g, return_state=True, impl="reference")
    assert_close(o, ro, name="o")
    assert_close(sf, rsf, name="final_state")
    grads = jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(gl.gated_linear_attention(cfg, q, k, v, g)[0] * do),
                             argnums=(0, 1, 2, 3)))(q, k, v, g)
    rgrads = jax.jit(jax.grad(lambda q, k, v, g: jnp.sum(ops.simple_gla(q, k, v, g, impl="reference") * do),
                              argnums=(0, 1, 2, 3)))(q, k, v, g)
    for name, got, want in zip(["dq", "dk", "dv", "dg"], grads, rgrads):
        assert_close(got, want, role="gate" if name == "dg" else "grad", name=name)


# ----------------------------------------------------------------------------- gla (per-channel gates)


def _kernel_g(g, t, chunk=gl.INTERPRET_TILES.chunk):
    """The clamped per-channel gate in kernel layout ``[B, H, Tp, Dk]`` (what :func:`gl.anchorable` reads)."""
    tp = -(-t // chunk) * chunk
    return gl._to_kernel(gl.bounded_log_gate(g), tp)


def _gla_case(b, t, h, dk, dv, dtype, seg=None, seed=0, g=None, tiles=gl.INTERPRET_TILES, anchored=True,
              h0=True):
    q, k, v, g0, h0_, do, dsf = _inputs(b, t, h, dk, dv, dtype, seed, gate="channel")
    g = g0 if g is None else g
    # which path the wrapper takes: the anchored kernel, or the exact jnp path for wide spans
    assert bool(gl.anchorable(_kernel_g(g, t, tiles.chunk), tiles.chunk)) == anchored
    cfg = _cfg(dk, gate="channel", tiles=tiles)
    resets = None if seg is None else _resets(seg)

    def kernel_fn(q, k, v, g, *h0):
        return gl.gated_linear_attention(cfg, q, k, v, g, initial_state=h0[0] if h0 else None, resets=resets)

    def ref_fn(q, k, v, g, *h0):
        return ops.gla(q, k, v, g, initial_state=h0[0] if h0 else None, return_state=True, segment_ids=seg,
                       impl="reference")

    names = ["dq", "dk", "dv", "dg"] + (["dh0"] if h0 else [])
    args = (q, k, v, g) + ((h0_,) if h0 else ())
    _check_against(kernel_fn, ref_fn, args, (do, dsf), dtype, names)
    _assert_no_races()


def _assert_no_races():
    """The interpreter's race detector (on in ``_cfg``) flagged nothing so far (where this jax exposes it)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:  # pragma: no cover - another jax
        return
    races = getattr(gpu_callbacks, "_races", None)
    assert races is None or not races.races_found


def test_gla_fp32_segments_hard_resets_two_dv_tiles():
    """Per-channel gates, fp32: T = 150 (padded to 3 chunks), documents ending inside a chunk and on a chunk
    boundary, a length-1 document, Dv = 128 over two Dv tiles, an initial state, hard resets (g = -inf,
    clamped to -30: a chunk's span ~31 nats, still anchored) on every channel and on some channels only."""
    b, t, h, d = 2, 150, 1, 64
    g = np.asarray(_inputs(b, t, h, d, d, jnp.float32, seed=0, gate="channel")[3]).copy()
    g[0, 5, 0, :] = -np.inf
    g[1, 70, 0, ::3] = -np.inf
    g[0, 128, :, 7] = -np.inf  # a chunk's first token
    g[0, 100, 0, :] = -1e30
    seg = _segments(b, t, [(40, 1, 69), (64,)])
    _gla_case(b, t, h, d, 2 * d, jnp.float32, seg=seg, g=jnp.asarray(g))


@pytest.mark.slow  # the registry conformance suite covers this family and dtype with documents by default
def test_gla_bf16_segments():
    seg = _segments(1, 100, [(30,)])
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(11), (1, 100, 2, 64)) + 4.0)
    g = g.at[0, 50, 1, :32].set(-jnp.inf)
    _gla_case(1, 100, 2, 64, 64, jnp.bfloat16, seg=seg, seed=1, g=g)


def test_gla_bf16_span_near_the_limit():
    """bf16, gates -0.12 per token plus a hard reset (clamped -30) in two chunks: spans ~37.7 nats, anchored
    factors near e^{±19}, no initial state and no segments."""
    b, t, h, d = 1, 100, 1, 64
    g = jnp.full((b, t, h, d), -0.12).at[:, 20].set(-jnp.inf).at[:, 90].set(-jnp.inf)
    _gla_case(b, t, h, d, d, jnp.bfloat16, seed=14, g=g, h0=False)


def test_gla_wide_span_takes_the_exact_path():
    """Two hard resets in one chunk (span ~60 nats > ANCHOR_SPAN): the wrapper's ``lax.cond`` takes the exact
    jnp path, which must still match the reference (forward and gradients), no initial state."""
    b, t, h, d = 1, 80, 1, 64
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(12), (b, t, h, d)) + 4.0)
    g = g.at[0, 10, 0, 3].set(-jnp.inf).at[0, 20, 0, 3].set(-jnp.inf)
    _gla_case(b, t, h, d, d, jnp.float32, seg=_segments(b, t, [(33,)]), seed=12, g=g, anchored=False, h0=False)


def test_gla_anchor_span_rule():
    """The span rule per chunk and channel: 40 nats in one chunk is anchored, 40.5 is not; a wide span in
    one channel of one chunk sends the whole call to the exact path."""
    g = jnp.zeros((1, 1, 128, 64))
    assert bool(gl.anchorable(g.at[0, 0, 3, 5].set(-40.0), 64))
    assert not bool(gl.anchorable(g.at[0, 0, 3, 5].set(-40.5), 64))
    # -25 at the end of chunk 0 and -25 at the start of chunk 1: each chunk spans 25 only
    assert bool(gl.anchorable(g.at[0, 0, 63, 5].set(-25.0).at[0, 0, 64, 5].set(-25.0), 64))
    lanes = gl.channel_lanes(g.at[0, 0, 3, 5].set(-30.0), None, 1, 1, 128, 64, 64)
    assert float(jnp.max(lanes.eq)) <= np.exp(20.0) * (1 + 1e-6)
    assert float(jnp.max(lanes.ek)) <= np.exp(20.0) * (1 + 1e-6)
    assert float(jnp.max(lanes.anc)) <= 1.0


# ----------------------------------------------------------------------------- linear_attention, retention


def test_linear_attention_no_decay():
    b, t, h, d = 1, 100, 2, 64
    q, k, v, _, h0, do, dsf = _inputs(b, t, h, d, d, jnp.float32, seed=4, gate="none")
    seg = _segments(b, t, [(50,)])
    cfg = _cfg(d, gate="none")
    resets = _resets(seg)

    def kernel_fn(q, k, v, h0):
        return gl.gated_linear_attention(cfg, q, k, v, None, h0, resets)

    def ref_fn(q, k, v, h0):
        return ops.linear_attention(q, k, v, initial_state=h0, return_state=True, segment_ids=seg,
                                    impl="reference")

    _check_against(kernel_fn, ref_fn, (q, k, v, h0), (do, dsf), jnp.float32, ["dq", "dk", "dv", "dh0"])


@pytest.mark.slow  # the registry conformance suite covers this family and dtype with documents by default
def test_retention_constant_decay():
    b, t, h, d = 1, 100, 2, 64
    q, k, v, _, h0, do, dsf = _inputs(b, t, h, d, d, jnp.float32, seed=6, gate="none")
    decay = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(h, dtype=jnp.float32))))  # RetNet's log γ_h
    cfg = _cfg(d, gate_grad=False)

    def kernel_fn(q, k, v, h0):
        g = jnp.broadcast_to(decay, (b, t, h))
        return gl.gated_linear_attention(cfg, q, k, v, g, h0)

    def ref_fn(q, k, v, h0):
        return ops.retention(q, k, v, decay=decay, initial_state=h0, return_state=True, impl="reference")

    _check_against(kernel_fn, ref_fn, (q, k, v, h0), (do, dsf), jnp.float32, ["dq", "dk", "dv", "dh0"])
    # no gate gradient with gate_grad=False
    dg = jax.grad(lambda g: jnp.sum(gl.gated_linear_attention(cfg, q, k, v, g, h0)[0]))(
        jnp.broadcast_to(decay, (b, t, h)))
    np.testing.assert_array_equal(np.asarray(dg), 0.0)


# ----------------------------------------------------------------------------- refusals and layout


def test_refusals():
    q = jnp.zeros((1, 64, 1, 64), jnp.float32)
    cfg = _cfg(64)
    with pytest.raises(ValueError, match="gate='scalar' needs"):
        gl.gated_linear_attention(cfg, q, q, q, jnp.zeros((1, 64, 1, 64)))
    with pytest.raises(ValueError, match="gate='channel' needs"):
        gl.gated_linear_attention(_cfg(64, gate="channel"), q, q, q, jnp.zeros((1, 64, 1)))
    q16 = q.astype(jnp.float16)
    with pytest.raises(ValueError, match="fp16"):
        gl.gated_linear_attention(_cfg(64, gate="channel"), q16, q16, q16, jnp.zeros((1, 64, 1, 64)))
    with pytest.raises(ValueError, match="multiple of 64"):
        gl.GLATiles(chunk=32)
    with pytest.raises(ValueError, match="multiple of 64"):
        gl.gated_linear_attention(cfg, q[..., :32], q[..., :32], q, jnp.zeros((1, 64, 1)))
    with pytest.raises(ValueError, match="gate"):
        gl.GLAGpuConfig(scale=1.0, gate="vector")


def test_h100_tiles_fit_shared_memory():
    for dtype in (jnp.bfloat16, jnp.float16):
        for gate in ("scalar", "channel"):
            sizes = gl.smem_bytes(gl.H100_TILES, 128, 128, dtype, gate)
            assert max(sizes.values()) <= gl.MAX_SMEM_BYTES, sizes


def test_chunk_lanes_hard_reset_and_decay():
    """The per-token rows: wq vanishes after a chunk's first reset, wk before its last, a = 0 with a reset."""
    g = jnp.full((1, 1, 128), -0.5)
    resets = jnp.zeros((1, 128), bool).at[0, 10].set(True)
    tok, decay = gl.chunk_lanes(g, resets, 1, 1, 128, 64, 64)
    tok = np.asarray(tok)[0, 0]
    assert np.all(tok[gl.ROW_WQ, 10:64] == 0) and np.all(tok[gl.ROW_WQ, :10] > 0)
    assert np.all(tok[gl.ROW_WK, :10] == 0) and np.all(tok[gl.ROW_WK, 10:64] > 0)
    np.testing.assert_allclose(np.asarray(decay)[0, 0, :, 0], [0.0, np.exp(-32.0)], rtol=1e-6)


# ----------------------------------------------------------------------------- larger (slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_simple_gla_production_shape_slow(dtype):
    """Dk = Dv = 128 (the production head size), 128-token chunks and Dv tiles, 300 tokens, documents."""
    tiles = gl.GLATiles(chunk=128, block_dv=128)
    seg = _segments(1, 300, [(100, 128)])
    _simple_gla_case(1, 300, 1, 128, 128, dtype, seg=seg, seed=7, tiles=tiles)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gla_production_shape_slow(dtype):
    """Per-channel gates at Dk = Dv = 128, 128-token chunks and Dv tiles, 300 tokens, documents, a hard reset."""
    tiles = gl.GLATiles(chunk=128, block_dv=128)
    seg = _segments(1, 300, [(100, 128)])
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(8), (1, 300, 1, 128)) + 4.0)
    g = g.at[0, 150, 0, ::2].set(-jnp.inf)
    _gla_case(1, 300, 1, 128, 128, dtype, seg=seg, seed=8, g=g, tiles=tiles)


@pytest.mark.slow
def test_gla_wide_span_bf16_slow():
    """bf16 on the exact path (strong decays logsigmoid(x)/0.1: spans of hundreds of nats per chunk)."""
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(13), (1, 100, 2, 64))) / 0.1
    _gla_case(1, 100, 2, 64, 64, jnp.bfloat16, seg=_segments(1, 100, [(37,)]), seed=13, g=g, anchored=False)


@pytest.mark.parametrize("stages", [1, 3])
def test_input_ring_stages(stages):
    """The chunk loop's input ring at other depths than the default 2 (1: no prefetch; 3: two chunks ahead,
    the ring wrapping around), T = 300 (5 chunks, the last padded), documents across chunk boundaries,
    under the race detector."""
    seg = _segments(1, 300, [(70, 100)])
    _simple_gla_case(1, 300, 1, 64, 64, jnp.float32, seg=seg, tiles=gl.GLATiles(64, 64, stages))


def test_tiles_reject_a_bad_ring_depth():
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match="stages"):
            gl.GLATiles(64, 64, bad)


def test_race_detector_clean():
    """Forward and backward under the interpreter's race detector (jax 0.10's ``races_found`` flag)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:  # pragma: no cover - another jax
        pytest.skip("the interpreter's race-detection state is not reachable in this jax")
    b, t, h, d = 1, 128, 1, 64
    q, k, v, g, h0, do, dsf = _inputs(b, t, h, d, d, jnp.bfloat16, seed=9)
    cfg = _cfg(d, races=True)
    out, vjp = jax.vjp(jax.jit(lambda *a: gl.gated_linear_attention(cfg, *a)), q, k, v, g, h0)
    jax.block_until_ready(vjp((do, dsf)))
    races = getattr(gpu_callbacks, "_races", None)
    if races is None:
        pytest.skip("the interpreter kept no race-detection state")
    assert not races.races_found
