"""linear_attention, retention, simple_gla, gla: the chunked XLA form against the fp32 token loop and itself.

Patterns (FAMILIES.md §5.4): oracle chain (xla vs reference, forward and VJP with cotangents on o and
final_state; decode step iterated vs parallel form), packed vs per-document, chained halves, equivalences
between the families, gate stress, feature-has-effect, bad input. Shapes are tiny and every jitted function
is cached per (variant, impl, chunk) so shapes shared between tests compile once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.ops import _gated_chunk
from seqmix.ops import explain
from seqmix.ops.gla import gla, gla_step
from seqmix.ops.linear_attention import (apply_feature_map, linear_attention, linear_attention_step,
                                         taylor_feature_map)
from seqmix.ops.retention import lightning_decay, retention, retention_step, retnet_decay
from seqmix.ops.simple_gla import simple_gla, simple_gla_step

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 oracles (FAMILIES.md §5.1 rule 8)

B, H, DK, DV = 2, 2, 8, 12


def _hedgehog(x):  # a positive learned-style map [B, T, H, D] -> [B, T, H, 2D] (callable feature map)
    return jax.nn.softmax(jnp.concatenate([x, -x], axis=-1), axis=-1)


# variant -> (op, gate kind: None | "head" ([H] decay) | "scalar" | "channel", op kwargs)
VARIANTS = {
    "linear_attention": (linear_attention, None, {}),
    "linear_attention_elu_norm": (linear_attention, None, {"feature_map": "elu", "normalize": True}),
    "linear_attention_taylor_norm": (linear_attention, None, {"feature_map": "taylor", "normalize": True}),
    "linear_attention_callable": (linear_attention, None, {"feature_map": _hedgehog}),
    "retention": (retention, "head", {}),
    "simple_gla": (simple_gla, "scalar", {}),
    "gla": (gla, "channel", {}),
}
MAIN = ["linear_attention", "retention", "simple_gla", "gla"]


def _state_dims(variant):
    _, _, kw = VARIANTS[variant]
    fm = kw.get("feature_map", "identity")
    dk = {"taylor": 1 + DK + DK * (DK + 1) // 2, "identity": DK, "elu": DK}.get(fm, 2 * DK)
    return dk, DV + (1 if kw.get("normalize") else 0)


def call_op(variant, q, k, v, gate, h0, seg, *, impl, chunk, return_state=True):
    op, kind, kw = VARIANTS[variant]
    args = (q, k, v) if kind in (None, "head") else (q, k, v, gate)
    extra = {"decay": gate} if kind == "head" else {}
    return op(*args, **kw, **extra, initial_state=h0, segment_ids=seg, return_state=return_state,
              chunk_size=chunk, impl=impl)


@functools.lru_cache(maxsize=None)
def fwd_fn(variant, impl, chunk=16):
    return jax.jit(functools.partial(call_op, variant, impl=impl, chunk=chunk))


@functools.lru_cache(maxsize=None)
def vjp_fn(variant, impl, chunk=16):
    def run(q, k, v, gate, h0, seg, cot):
        f = lambda *a: call_op(variant, *a, seg, impl=impl, chunk=chunk)  # noqa: E731
        out, pullback = jax.vjp(f, q, k, v, gate, h0)
        return out, pullback(cot)
    return jax.jit(run)


def _normal(rng, shape):  # numpy RNG: eager jax.random compiles once per shape, which dominates tiny tests
    return rng.standard_normal(shape).astype(np.float32)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_gate(kind, rng, t, *, z=1.0, b=B):
    if kind is None:
        return None
    if kind == "head":
        return jnp.asarray([-0.05, -0.3][:H], jnp.float32)
    shape = (b, t, H) if kind == "scalar" else (b, t, H, DK)
    return jnp.asarray(_log_sigmoid(_normal(rng, shape) + 3.0) / z)


def make_inputs(variant, t, *, seed=0, dtype=jnp.float32, z=1.0, h0=True):
    _, kind, kw = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(_normal(rng, (B, t, H, d)), dtype) for d in (DK, DK, DV))
    gate = make_gate(kind, rng, t, z=z)
    state = None
    if h0:
        if kind is None:  # a genuine state of a previous segment (keeps the normalizer meaningful)
            fk = apply_feature_map(kw.get("feature_map", "identity"), jnp.asarray(_normal(rng, (B, 5, H, DK))))
            pv = _normal(rng, (B, 5, H, DV))
            if kw.get("normalize"):
                pv = np.concatenate([pv, np.ones_like(pv[..., :1])], axis=-1)
            state = jnp.einsum("bthk,bthv->bhkv", fk, pv)
        else:
            state = jnp.asarray(_normal(rng, (B, H) + _state_dims(variant)))
    return q, k, v, gate, state


def make_cotangents(variant, t, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(_normal(rng, (B, t, H, DV)), dtype), jnp.asarray(_normal(rng, (B, H) + _state_dims(variant))))


def segments(*rows):
    """segment_ids [len(rows), T] from per-row document lengths."""
    return jnp.asarray([np.repeat(np.arange(len(r)), r) for r in rows], jnp.int32)


def f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


NAMES = ("dq", "dk", "dv", "dg", "dh0")
ROLES = ("grad", "grad", "grad", "gate", "grad")


def compare_outputs_and_grads(got, want, kind):
    (o, s), grads = got
    (o_r, s_r), grads_r = want
    testing.assert_close(o, o_r, kind=kind, role="out", name="o")
    testing.assert_close(s, s_r, kind=kind, role="out", name="final_state")
    for name, role, gx, gr in zip(NAMES, ROLES, grads, grads_r):
        assert (gx is None) == (gr is None), name
        if gx is not None:
            testing.assert_close(gx, gr, kind=kind, role=role, name=name)


# ----------------------------------------------------------------------------- oracle: xla vs reference

REF_CASES = {
    # name: (dtype, T, chunk sizes, segment lengths per row or None)
    "fp32-T37": (jnp.float32, 37, (16, 32), ([5, 1, 16, 15], [17, 20])),
    "fp32-T100": (jnp.float32, 100, (64,), None),
    "bf16-T100": (jnp.bfloat16, 100, (32,), ([30, 1, 33, 36], [64, 36])),
}


def _check_against_reference(variant, dtype, t, chunks, seg_lengths):
    q, k, v, gate, h0 = make_inputs(variant, t, dtype=dtype)
    seg = None if seg_lengths is None else segments(*seg_lengths)
    cot = make_cotangents(variant, t, dtype=dtype)
    kind = testing.tolerance_kind(dtype, "recurrent")
    # the oracle sees the same (rounded) values in fp32
    want = vjp_fn(variant, "reference", 64)(f32(q), f32(k), f32(v), gate, h0, seg, tuple(map(f32, cot)))
    for chunk in chunks:
        got = vjp_fn(variant, "xla", chunk)(q, k, v, gate, h0, seg, cot)
        assert got[0][0].dtype == dtype and got[0][1].dtype == jnp.float32
        compare_outputs_and_grads(got, want, kind)
        if variant == "retention":  # a fixed hyperparameter: no gate gradient (FAMILIES.md §2.5)
            assert not np.asarray(got[1][3]).any()


@pytest.mark.parametrize("case", list(REF_CASES))
@pytest.mark.parametrize("variant", MAIN)
def test_xla_matches_reference(variant, case):
    _check_against_reference(variant, *REF_CASES[case])


@pytest.mark.parametrize("variant", ["linear_attention_elu_norm", "linear_attention_taylor_norm",
                                     "linear_attention_callable"])
def test_feature_maps_match_reference(variant):
    _check_against_reference(variant, *REF_CASES["fp32-T37"])


def test_length_one():
    _check_against_reference("gla", jnp.float32, 1, (16,), None)


@pytest.mark.parametrize("variant", ["simple_gla", "gla"])
def test_gate_gradient_matches_finite_differences(variant):
    """The closed-form dg (xla) against central differences of the fp32 reference."""
    t = 37
    q, k, v, gate, h0 = make_inputs(variant, t)
    gate = gate - 0.1  # stays <= 0 under the perturbation
    cot = make_cotangents(variant, t)
    (_, grads) = vjp_fn(variant, "xla", 16)(q, k, v, gate, h0, None, cot)
    u = jnp.asarray(np.random.default_rng(7).uniform(-1.0, 1.0, gate.shape).astype(np.float32))
    ref = fwd_fn(variant, "reference", 64)

    def loss(gg):
        o, s = ref(q, k, v, gg, h0, None)
        return float(jnp.sum(o * cot[0]) + jnp.sum(s * cot[1]))

    eps = 1e-2
    fd = (loss(gate + eps * u) - loss(gate - eps * u)) / (2 * eps)
    analytic = float(jnp.sum(grads[3] * u))
    assert abs(fd - analytic) <= 2e-3 * abs(analytic) + 1e-3, (fd, analytic)


# ----------------------------------------------------------------------------- decode step


def _run_steps(variant, q, k, v, gate, h0):
    _, kind, kw = VARIANTS[variant]

    def body(state, xs):
        q_t, k_t, v_t, g_t = xs
        if kind is None:
            return linear_attention_step(q_t, k_t, v_t, state, **kw)[::-1]
        if kind == "head":
            return retention_step(q_t, k_t, v_t, state, decay=gate)[::-1]
        step = simple_gla_step if kind == "scalar" else gla_step
        return step(q_t, k_t, v_t, state, g=g_t)[::-1]

    mv = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731
    g_seq = mv(gate) if kind in ("scalar", "channel") else None
    final, o = jax.lax.scan(body, h0, (mv(q), mv(k), mv(v), g_seq))
    return jnp.moveaxis(o, 0, 1), final


@pytest.mark.parametrize("variant", MAIN + ["linear_attention_taylor_norm"])
def test_decode_steps_match_parallel_form(variant):
    t = 37
    q, k, v, gate, h0 = make_inputs(variant, t, seed=3)
    o_steps, s_steps = jax.jit(functools.partial(_run_steps, variant))(q, k, v, gate, h0)
    o, s = fwd_fn(variant, "xla")(q, k, v, gate, h0, None)
    testing.assert_close(o, o_steps, name="o")
    testing.assert_close(s, s_steps, name="final_state")


def test_decode_step_starts_from_zero_state():
    q, k, v, gate, _ = make_inputs("gla", 1, seed=4)
    o_t, s = gla_step(q[:, 0], k[:, 0], v[:, 0], None, g=gate[:, 0])
    o = gla(q, k, v, gate, impl="reference")
    testing.assert_close(o_t, o[:, 0], name="o")
    assert s.shape == (B, H, DK, DV) and s.dtype == jnp.float32


# ----------------------------------------------------------------------------- packed, chained

PACKED_CHUNK = 16
PACKED_DOCS = [16, 1, 15, 16]  # ends on a boundary, a length-1 doc just off it, ends on 32 and on T


@pytest.mark.parametrize("variant", ["linear_attention_elu_norm", "retention", "simple_gla", "gla"])
def test_packed_equals_per_document(variant):
    t = sum(PACKED_DOCS)
    q, k, v, gate, h0 = make_inputs(variant, t, seed=5)
    seg = segments(PACKED_DOCS, PACKED_DOCS)
    fn = fwd_fn(variant, "xla", PACKED_CHUNK)
    o, s = fn(q, k, v, gate, h0, seg)
    start = 0
    state = h0  # the initial state feeds the first document only
    for length in PACKED_DOCS:
        sl = slice(start, start + length)
        g_doc = gate[:, sl] if gate is not None and gate.ndim > 1 else gate
        o_doc, s_doc = fn(q[:, sl], k[:, sl], v[:, sl], g_doc, state, None)
        testing.assert_close(o[:, sl], o_doc, name=f"o[{start}:{start + length}]")
        state = jnp.zeros_like(h0)
        start += length
    testing.assert_close(s, s_doc, name="final_state (last document)")


@pytest.mark.parametrize("variant", ["linear_attention_elu_norm", "retention", "simple_gla", "gla"])
def test_chained_halves_equal_one_call(variant):
    t = 48
    q, k, v, gate, h0 = make_inputs(variant, t, seed=6)
    fn = fwd_fn(variant, "xla", 16)
    o, s = fn(q, k, v, gate, h0, None)
    for split in (24, 32):  # inside a chunk, on a chunk boundary
        parts = [slice(0, split), slice(split, t)]
        g_of = lambda sl: gate[:, sl] if gate is not None and gate.ndim > 1 else gate  # noqa: E731
        o1, s1 = fn(q[:, parts[0]], k[:, parts[0]], v[:, parts[0]], g_of(parts[0]), h0, None)
        o2, s2 = fn(q[:, parts[1]], k[:, parts[1]], v[:, parts[1]], g_of(parts[1]), s1, None)
        testing.assert_close(jnp.concatenate([o1, o2], axis=1), o, name=f"o (split {split})")
        testing.assert_close(s2, s, name=f"final_state (split {split})")


# ----------------------------------------------------------------------------- equivalences


def test_simple_gla_with_constant_gate_is_retention():
    q, k, v, decay, h0 = make_inputs("retention", 37)
    g = jnp.broadcast_to(decay, (B, 37, H))
    o_r, s_r = fwd_fn("retention", "xla")(q, k, v, decay, h0, None)
    o_s, s_s = fwd_fn("simple_gla", "xla")(q, k, v, g, h0, None)
    testing.assert_close(o_s, o_r, name="o")
    testing.assert_close(s_s, s_r, name="final_state")
    o_h, s_h = simple_gla(q, k, v, decay, initial_state=h0, return_state=True, chunk_size=16)  # g_gamma [H]
    testing.assert_close(o_h, o_r, name="o (g [H])")
    testing.assert_close(s_h, s_r, name="final_state (g [H])")


def test_gla_with_zero_gate_is_linear_attention():
    q, k, v, _, h0 = make_inputs("linear_attention", 37)
    o_l, s_l = fwd_fn("linear_attention", "xla")(q, k, v, None, h0, None)
    o_g, s_g = fwd_fn("gla", "xla")(q, k, v, jnp.zeros((B, 37, H, DK)), h0, None)
    testing.assert_close(o_g, o_l, name="o")
    testing.assert_close(s_g, s_l, name="final_state")


def test_gla_with_broadcast_scalar_gate_is_simple_gla():
    q, k, v, g, h0 = make_inputs("simple_gla", 37)
    o_s, s_s = fwd_fn("simple_gla", "xla")(q, k, v, g, h0, None)
    o_g, s_g = fwd_fn("gla", "xla")(q, k, v, jnp.broadcast_to(g[..., None], (B, 37, H, DK)), h0, None)
    testing.assert_close(o_g, o_s, name="o")
    testing.assert_close(s_g, s_s, name="final_state")


def test_taylor_feature_map_identity():
    rng = np.random.default_rng(0)
    phi = jax.jit(taylor_feature_map)
    for d in (4, 16):
        q, k = jnp.asarray(_normal(rng, (5, d))), jnp.asarray(_normal(rng, (5, d)))
        s = (q * k).sum(-1) / math.sqrt(d)
        got = (phi(q) * phi(k)).sum(-1)
        np.testing.assert_allclose(got, 1 + s + s ** 2 / 2, rtol=1e-5, atol=1e-5)
        assert phi(q).shape[-1] == 1 + d + d * (d + 1) // 2


def test_elu_feature_map_keeps_small_values():
    """elu(x) + 1 is exp(x) for x <= 0: positive and relatively exact down to fp32's smallest normals (the
    expm1(x) + 1 form rounds it to 0 below x = -17, and loses digits to cancellation from x = -1 on); its
    gradient is exp(x) there, 1 above, and 1 at 0 (both one-sided derivatives)."""
    x = np.linspace(-80.0, 5.0, 20001, dtype=np.float32)
    phi = np.asarray(apply_feature_map("elu", jnp.asarray(x)))
    x64 = x.astype(np.float64)
    want = np.where(x64 > 0, x64 + 1.0, np.exp(x64))
    assert (phi > 0).all()
    np.testing.assert_allclose(phi, want, rtol=2e-7)
    grad = jax.vmap(jax.grad(lambda t: apply_feature_map("elu", t)))(jnp.asarray([-30.0, -1.0, 0.0, 2.0]))
    np.testing.assert_allclose(grad, [math.exp(-30.0), math.exp(-1.0), 1.0, 1.0], rtol=1e-6)


def test_decay_presets():
    np.testing.assert_allclose(retnet_decay(3), np.log(1 - 2.0 ** (-5 - np.arange(3))), rtol=1e-6)
    np.testing.assert_allclose(lightning_decay(4, 1, 4), -(8 / 4) * (1 - 1 / 4) * np.arange(4), rtol=1e-6)
    assert bool(jnp.all(retnet_decay(8) < 0)) and bool(jnp.all(lightning_decay(8, 0, 2) <= 0))


# ----------------------------------------------------------------------------- gate stress, effects


def _stress_gate(variant, name, t, seed=8):
    kind = VARIANTS[variant][1]
    shape = (B, t, H) if kind == "scalar" else (B, t, H, DK)
    x = _normal(np.random.default_rng(seed), shape)
    if name.startswith("z="):
        return jnp.asarray(_log_sigmoid(x) / float(name[2:]))
    if name == "-50":
        return jnp.full(shape, -50.0)
    if name == "~0":
        return jnp.asarray(-1e-7 * np.exp(_log_sigmoid(x)))
    raise AssertionError(name)


STRESS = ["z=0.01", "z=1", "z=10", "-50", "~0"]


@pytest.mark.parametrize("variant", ["simple_gla", "gla"])
def test_extreme_gates(variant):
    q, k, v, _, h0 = make_inputs(variant, 100)
    cot = make_cotangents(variant, 100)
    for name in STRESS:
        g = _stress_gate(variant, name, 100)
        got = vjp_fn(variant, "xla", 64)(q, k, v, g, h0, None, cot)
        want = vjp_fn(variant, "reference", 64)(q, k, v, g, h0, None, cot)
        (o, s), (dq, dk, dv, dg, dh0) = got
        (o_r, s_r), (dq_r, dk_r, dv_r, dg_r, dh0_r) = want
        for x, r, n, role in ((o, o_r, "o", "out"), (s, s_r, "final_state", "out"), (dq, dq_r, "dq", "grad"),
                              (dk, dk_r, "dk", "grad"), (dv, dv_r, "dv", "grad"), (dh0, dh0_r, "dh0", "grad")):
            testing.assert_close(x, r, role=role, name=f"{n} ({name})")
        # dg with a final-state cotangent: when the true gradient is ~0 (g = -50) the closed form's row-end
        # term S_T ⊙ dS_T leaves fp32 cancellation noise; measure it against the terms' natural scale.
        natural = float(jnp.max(jnp.abs(q * dq_r)) + jnp.max(jnp.abs(k * dk_r)) + jnp.max(jnp.abs(s_r)))
        err = float(jnp.max(jnp.abs(dg - dg_r)))
        assert np.isfinite(np.asarray(dg)).all() and err <= 1e-5 * natural, (name, err, natural)
        # without it, dg keeps the standard tolerance even for extreme gates
        cot0 = (cot[0], jnp.zeros_like(cot[1]))
        dg0 = vjp_fn(variant, "xla", 64)(q, k, v, g, h0, None, cot0)[1][3]
        dg0_r = vjp_fn(variant, "reference", 64)(q, k, v, g, h0, None, cot0)[1][3]
        testing.assert_close(dg0, dg0_r, role="gate", name=f"dg without dS_T ({name})")
    # long input: everything stays finite
    t = 1000
    q, k, v, _, h0 = make_inputs(variant, t, seed=9)
    cot = make_cotangents(variant, t)
    for name in STRESS:
        (o, s), grads = vjp_fn(variant, "xla", 64)(q, k, v, _stress_gate(variant, name, t), h0, None, cot)
        for x in (o, s) + tuple(grads):
            assert np.isfinite(np.asarray(x)).all(), name


@pytest.mark.parametrize("variant", ["retention", "simple_gla", "gla"])
def test_gate_has_effect(variant):
    q, k, v, gate, h0 = make_inputs(variant, 37)
    o1, _ = fwd_fn(variant, "xla")(q, k, v, gate, h0, None)
    o2, _ = fwd_fn(variant, "xla")(q, k, v, gate * 2.0, h0, None)
    testing.assert_not_close(o2, o1, name="o")


def test_features_have_effect():
    q, k, v, _, h0 = make_inputs("linear_attention", 37)
    base = linear_attention(q, k, v)
    testing.assert_not_close(linear_attention(q, k, v, feature_map="elu"), base, name="feature_map")
    testing.assert_not_close(linear_attention(q, k, v, initial_state=h0), base, name="initial_state")
    elu = linear_attention(q, k, v, feature_map="elu")
    testing.assert_not_close(linear_attention(q, k, v, feature_map="elu", normalize=True), elu, name="normalize")
    seg = segments([20, 17], [37])
    testing.assert_not_close(linear_attention(q, k, v, segment_ids=seg), base, name="segment_ids")


def test_deterministic():
    q, k, v, gate, h0 = make_inputs("gla", 37)
    cot = make_cotangents("gla", 37)
    fn = vjp_fn("gla", "xla", 16)
    a, b = fn(q, k, v, gate, h0, None, cot), fn(q, k, v, gate, h0, None, cot)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_return_types_and_dispatch():
    q, k, v, gate, _ = make_inputs("gla", 20, dtype=jnp.bfloat16)
    o = gla(q, k, v, gate)
    assert o.shape == (B, 20, H, DV) and o.dtype == jnp.bfloat16
    o, s = linear_attention(q, k, v, feature_map="taylor", normalize=True, return_state=True)
    assert o.shape == (B, 20, H, DV) and s.shape == (B, H, 1 + DK + DK * (DK + 1) // 2, DV + 1)
    assert s.dtype == jnp.float32
    text = explain(gla, q, k, v, gate, chunk_size=32)
    assert "run  xla" in text and "chunk_size=32" in text and "sub_chunk=16" in text
    assert _gated_chunk.effective_chunk(1, 64) == (16, 16)
    assert _gated_chunk.effective_chunk(100, 64) == (64, 16)
    assert _gated_chunk.effective_chunk(37, 24) == (24, 8)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    q, k, v, g, _ = make_inputs("gla", 8)
    gs = g[..., 0]
    with pytest.raises(ValueError, match="rank 4"):
        gla(q[0], k[0], v[0], g[0])
    with pytest.raises(ValueError, match="v must match q"):
        simple_gla(q, k, v[:, :, :1], gs)
    with pytest.raises(ValueError, match="k must have q's shape"):
        linear_attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match=r"g \(log-space gate\) must have shape"):
        gla(q, k, v, gs)
    with pytest.raises(ValueError, match=r"g \(log-space gate\) must have shape"):
        simple_gla(q, k, v, g)
    with pytest.raises(ValueError, match="must be <= 0"):
        gla(q, k, v, -g)
    with pytest.raises(ValueError, match="must be <= 0"):
        retention(q, k, v, decay=jnp.array([0.1, -0.1]))
    with pytest.raises(ValueError, match="decay must have shape"):
        retention(q, k, v, decay=jnp.array([-0.1, -0.1, -0.1]))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map=lambda x: x[..., 0])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_attention(q, k, v, feature_map="taylor", initial_state=jnp.zeros((B, H, DK, DV)))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_attention(q, k, v, normalize=True, initial_state=jnp.zeros((B, H, DK, DV)))
    with pytest.raises(ValueError, match="segment_ids"):
        gla(q, k, v, g, segment_ids=jnp.zeros((B, 7), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        gla(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="g must have shape"):
        gla_step(q[:, 0], k[:, 0], v[:, 0], None, g=gs[:, 0])
    with pytest.raises(ValueError, match="state"):
        simple_gla_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((B, H, DK, DK + 1)), g=gs[:, 0])


def _chunked_vjp(q, k, v, g, h0, resets, cot, chunk):
    """The per-channel chunked form's output and VJP, traced afresh (so a patched ANCHOR_SPAN takes effect)."""
    cfg = _gated_chunk.make_config(q, g, chunk, 1.0 / math.sqrt(q.shape[-1]))
    f = lambda *a: _gated_chunk._chunked(cfg, *a, resets)  # noqa: E731
    out, pullback = jax.vjp(f, q, k, v, g, h0)
    return out, pullback(cot)


def test_gla_wide_chunks_among_typical_ones_match_the_reference(monkeypatch):
    """Only the chunks whose gates are too wide for the anchored matmul take secondary chunking, a few per
    loop step (here 5, so the last step is partly padding): forward and VJP equal the token-loop reference."""
    t = 300  # chunks of 32: tokens 10-17, 70-77 and 200-207 sit in chunks 0, 2 and 6
    q, k, v, g, h0 = make_inputs("gla", t)
    hard = jnp.concatenate([jnp.arange(8) + t0 for t0 in (10, 70, 200)])
    g = g.at[:, hard].set(-30.0)  # spans of 240 nats: the anchored factors would overflow (e^120)
    cot = make_cotangents("gla", t)
    cfg = _gated_chunk.make_config(q, g, 32, 1.0)
    wide = _gated_chunk._wide_chunks(_gated_chunk._split(cfg, q, k, v, g, None).G)
    assert int(wide.sum()) == 3 * B * H and 5 < wide.size
    monkeypatch.setattr(_gated_chunk, "WIDE_BATCH", 5)
    ours = jax.jit(lambda *a: _chunked_vjp(*a, 32))(q, k, v, g, h0, None, cot)  # a new trace
    ref = vjp_fn("gla", "reference")(q, k, v, g, h0, None, cot)
    names = ("o", "final_state") + NAMES
    roles = ("out", "out") + ROLES
    for x, y, n, role in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), names, roles):
        testing.assert_close(x, y, role=role, name=n)


def test_gla_anchored_and_secondary_paths_agree(monkeypatch):
    """Typical gates take the one-matmul anchored path, wide gate spans the secondary chunking; on an input
    both can serve they agree (forward, VJP, with segments and a length that does not divide the chunk)."""
    t = 100
    q, k, v, _, h0 = make_inputs("gla", t)
    g = _stress_gate("gla", "z=10", t)
    cot = make_cotangents("gla", t)
    resets = segments([30, 70], [100]) != jnp.roll(segments([30, 70], [100]), 1, axis=1)
    resets = resets.at[:, 0].set(True)
    split = _gated_chunk._split(_gated_chunk.make_config(q, g, 64, 1.0), q, k, v, g, resets)
    assert not bool(jnp.any(_gated_chunk._wide_chunks(split.G)))
    wide = _stress_gate("gla", "-50", t)
    assert bool(jnp.all(_gated_chunk._wide_chunks(_gated_chunk._split(
        _gated_chunk.make_config(q, wide, 64, 1.0), q, k, v, wide, resets).G)))
    run = lambda: jax.jit(lambda *a: _chunked_vjp(*a, 64))(q, k, v, g, h0, resets, cot)  # noqa: E731  a new trace
    anchored = run()
    monkeypatch.setattr(_gated_chunk, "ANCHOR_SPAN", -1.0)  # every chunk is wide: secondary chunking
    secondary = run()
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dh0")
    roles = ("out", "out", "grad", "grad", "grad", "gate", "grad")
    for x, y, n, role in zip(jax.tree_util.tree_leaves(anchored), jax.tree_util.tree_leaves(secondary), names, roles):
        testing.assert_close(x, y, role=role, name=n)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunk_reverse_cumsum_matches_a_token_loop(gate, with_resets):
    """The gate gradient's segmented reverse cumsum in chunk layout (a masked matmul inside chunks, a carry
    across them) against ``y_t = x_t + y_{t+1}`` token by token: segments that span several chunks, resets on
    a chunk's first token and just after it, a length that does not divide the chunk."""
    t, chunk, d = 150, 16, 3
    rng = np.random.default_rng(7)
    resets = np.zeros((B, t), bool)
    if with_resets:
        resets[0, [0, 16, 17, 40, 99, 100, 149]] = True  # 40 -> 99 spans chunks 2..6
        resets[1, [5, 64]] = True  # 64 -> 149: five chunks in one segment
    q = jnp.zeros((B, t, H, DK))
    g = jnp.zeros((B, t, H) + ((DK,) if gate == "channel" else ()))
    cfg = _gated_chunk.make_config(q, g, chunk, 1.0)
    x = _gated_chunk._split(cfg, q, q, q, g, jnp.asarray(resets) if with_resets else None)
    ok = _gated_chunk._factors(cfg, x).ok
    n = x.q.shape[1]
    vals = rng.normal(size=(B * H, n * chunk) + ((d,) if gate == "channel" else ())).astype(np.float32)
    tail = rng.normal(size=(B * H,) + vals.shape[2:]).astype(np.float32)
    got = _gated_chunk._chunk_reverse_cumsum(jnp.asarray(vals.reshape((B * H, n, chunk) + vals.shape[2:])),
                                             x.seg, ok, jnp.asarray(tail))
    starts = np.repeat(np.pad(resets, [(0, 0), (0, n * chunk - t)]), H, axis=0)
    want = np.zeros_like(vals)
    for z in range(B * H):
        acc = tail[z].astype(np.float64)  # after the last token, in its segment
        for i in reversed(range(n * chunk)):
            acc = vals[z, i] + (0.0 if i + 1 < n * chunk and starts[z, i + 1] else acc)
            want[z, i] = acc
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", MAIN)
def test_groups_of_chunks_match_the_reference(variant, monkeypatch):
    """Long inputs run the chunked form group by group, carrying the state forward and its gradient backward:
    here 4 groups of 3 chunks of 16 (the last one mostly padding), segments that cross group boundaries and an
    initial state; output, final state and VJP against the token-loop reference."""
    t = 150
    q, k, v, gate, h0 = make_inputs(variant, t)
    seg = segments([40, 1, 70, 39], [100, 50])
    cot = make_cotangents(variant, t)
    monkeypatch.setattr(_gated_chunk, "GROUP_ROW_TOKENS", dict.fromkeys(("none", "scalar", "channel"), B * H * 48))
    cfg = _gated_chunk.make_config(q, None, 16, 1.0)
    assert (cfg.group, cfg.groups) == (48, 4)

    def run(q, k, v, gate, h0, seg, cot):
        f = lambda *a: call_op(variant, *a, seg, impl="xla", chunk=16)  # noqa: E731
        out, pullback = jax.vjp(f, q, k, v, gate, h0)
        return out, pullback(cot)

    got = jax.jit(run)(q, k, v, gate, h0, seg, cot)  # a new trace: the patched group size takes effect
    want = vjp_fn(variant, "reference", 16)(q, k, v, gate, h0, seg, cot)
    compare_outputs_and_grads(got, want, testing.tolerance_kind(jnp.float32, "recurrent"))
