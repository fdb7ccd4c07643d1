"""DeltaNet (``delta_rule``) and Gated DeltaNet (``gated_delta_rule``): chunked XLA vs the token loop.

Oracle chain (FAMILIES.md §5.4): reference (fp32 token loop) -> decode step iterated -> chunked XLA
(WY/UT transform, custom VJP). Inputs follow the layers' conventions: L2-normalized k, β = σ(x).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import solve_triangular

from seqmix.ops import _chunk_groups, _delta_chunk, _registry
from seqmix.ops.delta_rule import delta_rule, delta_rule_step
from seqmix.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from seqmix.testing import assert_close, assert_not_close, tolerance_kind

jax.config.update("jax_default_matmul_precision", "highest")

DN, GDN = "delta_rule", "gated_delta_rule"
GRADS = {DN: ("dq", "dk", "dv", "dbeta", "dh0"), GDN: ("dq", "dk", "dv", "dg", "dbeta", "dh0")}
ROLE = {"dq": "grad", "dk": "grad", "dv": "grad", "dh0": "grad", "dg": "gate", "dbeta": "gate"}


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_inputs(seed, b=2, t=37, h=2, dk=8, dv=16, dtype=jnp.float32, z=1.0, beta_mode="sigmoid"):
    """numpy-generated inputs (no per-shape compilation): L2-normalized k, β = σ(x), g = logσ(x + 2)/z."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, dk), np.float32)
    k = rng.standard_normal((b, t, h, dk), np.float32)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, h, dv), np.float32)
    x = rng.standard_normal((b, t, h)).astype(np.float32)
    sig = 1.0 / (1.0 + np.exp(-x))
    beta = {"sigmoid": sig, "near0": 1e-3 * sig, "near1": 1.0 - 1e-3 * sig,
            "upto2": 2.0 / (1.0 + np.exp(-2.0 * x))}[beta_mode]
    g = _logsigmoid(rng.standard_normal((b, t, h)) + 2.0) / z
    h0 = 0.5 * rng.standard_normal((b, h, dk, dv))
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    return dict(q=f32(q).astype(dtype), k=f32(k).astype(dtype), v=f32(v).astype(dtype), g=f32(g),
                beta=f32(beta), h0=f32(h0))


def apply(fam, ins, **kw):
    if fam == DN:
        return delta_rule(ins["q"], ins["k"], ins["v"], ins["beta"], **kw)
    return gated_delta_rule(ins["q"], ins["k"], ins["v"], ins["g"], ins["beta"], **kw)


def seg_from_lengths(*rows):
    return jnp.array([np.repeat(np.arange(len(r)), r) for r in rows], jnp.int32)


@functools.lru_cache(maxsize=None)
def _vjp_fn(fam, impl, chunk):
    """jit: (inputs, segment_ids, cotangents) -> ((o, final_state), grads in GRADS[fam] order)."""

    def run(ins, seg, do, dsf):
        names = ("q", "k", "v", "beta", "h0") if fam == DN else ("q", "k", "v", "g", "beta", "h0")

        def f(*args):
            x = dict(zip(names, args))
            x.setdefault("g", ins["g"])
            return apply(fam, x, initial_state=x["h0"], return_state=True, segment_ids=seg,
                         chunk_size=chunk, impl=impl)

        out, vjp = jax.vjp(f, *(ins[n] for n in names))
        return out, vjp((do.astype(out[0].dtype), dsf))

    return jax.jit(run)


def cotangents(ins, seed=7):
    b, t, h, _ = ins["q"].shape
    dk, dv = ins["h0"].shape[-2:]
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, t, h, dv), np.float32)),
            jnp.asarray(rng.standard_normal((b, h, dk, dv), np.float32)))


def compare(fam, ins, chunk, seg=None, kind=None, fresh=False):
    """Forward (o, final_state) and VJP of ``xla`` against ``reference``; returns the xla results.
    ``fresh``: trace ``xla`` anew (a patched module setting takes effect)."""
    kind = kind or tolerance_kind(ins["q"].dtype, "recurrent")
    do, dsf = cotangents(ins)
    (o_r, s_r), g_r = _vjp_fn(fam, "reference", chunk)(ins, seg, do, dsf)
    (o, s), gr = (_vjp_fn.__wrapped__ if fresh else _vjp_fn)(fam, "xla", chunk)(ins, seg, do, dsf)
    assert o.dtype == ins["q"].dtype and s.dtype == jnp.float32
    assert_close(o, o_r, kind=kind, role="out", name="o")
    assert_close(s, s_r, kind=kind, role="out", name="final_state")
    for name, a, r in zip(GRADS[fam], gr, g_r):
        assert_close(a, r, kind=kind, role=ROLE[name], name=name)
    return (o, s), gr


# ----------------------------------------------------------------------------- triangular inverse


@pytest.mark.parametrize("c", [1, 5, 16, 37, 64])
def test_tri_inverse_matches_linalg(c):
    rng = np.random.default_rng(c)
    a = np.tril(rng.standard_normal((3, c, c)), -1).astype(np.float32) * 0.3
    # identical keys with β = 1: (I + L)⁻¹ has O(1) entries, the Neumann terms L^n are binomial-sized
    a[2] = np.tril(np.ones((c, c)), -1)
    eye = np.eye(c)
    ref = solve_triangular(jnp.asarray(eye + a), jnp.asarray(np.broadcast_to(eye, a.shape)), lower=True)
    assert_close(jax.jit(_delta_chunk.tri_inverse)(jnp.asarray(a)), ref, name="T")
    assert_close(ref[2], np.linalg.inv(eye + a[2]), name="solve_triangular vs inv")


# ----------------------------------------------------------------------------- xla vs reference


@pytest.mark.parametrize("fam,t,chunk", [
    (GDN, 1, 16), (GDN, 37, 16), (GDN, 100, 64), (DN, 37, 16), (DN, 100, 32),
])
def test_xla_matches_reference_fp32(fam, t, chunk):
    compare(fam, make_inputs(t, t=t), chunk)


@pytest.mark.parametrize("fam,t,chunk", [(GDN, 100, 32), (DN, 37, 16)])
def test_xla_matches_reference_bf16(fam, t, chunk):
    (o, _), grads = compare(fam, make_inputs(t + 1, t=t, dtype=jnp.bfloat16), chunk)
    assert grads[0].dtype == jnp.bfloat16


# documents of length 1, ending exactly on (16, 32) and just off (17, 49) 16-token chunk boundaries
SEG_ROWS = ((1, 15, 16, 17, 15), (16, 1, 15, 17, 15))


@pytest.mark.parametrize("fam", [GDN, DN])
def test_segments_match_reference(fam):
    compare(fam, make_inputs(3, t=64), 16, seg=seg_from_lengths(*SEG_ROWS))


@functools.lru_cache(maxsize=None)
def _fwd_fn(fam, chunk):
    def run(ins, seg):
        return apply(fam, ins, initial_state=ins["h0"], return_state=True, segment_ids=seg,
                     chunk_size=chunk, impl="xla")
    return jax.jit(run)


def test_packed_equals_per_document():
    ins = make_inputs(4, t=64)
    seg = seg_from_lengths(*SEG_ROWS)
    o, s = _fwd_fn(GDN, 16)(ins, seg)
    for row, lengths in enumerate(SEG_ROWS):
        start = 0
        for i, n in enumerate(lengths):
            doc = {name: x[row:row + 1, start:start + n] for name, x in ins.items() if name != "h0"}
            doc["h0"] = ins["h0"][row:row + 1] * (1.0 if i == 0 else 0.0)  # only the first doc sees h0
            o_d, s_d = _fwd_fn(GDN, 16)(doc, None)
            assert_close(o[row:row + 1, start:start + n], o_d, name=f"o row {row} doc {i}")
            start += n
        assert_close(s[row:row + 1], s_d, name=f"final_state row {row}")


@pytest.mark.parametrize("split", [37, 32])
def test_chained_halves_equal_one_call(split):
    ins = make_inputs(5, t=64)
    o, s = _fwd_fn(GDN, 16)(ins, None)
    first = {n: (x[:, :split] if n != "h0" else x) for n, x in ins.items()}
    o1, s1 = _fwd_fn(GDN, 16)(first, None)
    second = {n: (x[:, split:] if n != "h0" else s1) for n, x in ins.items()}
    o2, s2 = _fwd_fn(GDN, 16)(second, None)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, name="o")
    assert_close(s2, s, name="final_state")


@pytest.mark.parametrize("fam", [GDN, DN])
def test_decode_steps_equal_parallel(fam):
    ins = make_inputs(6, t=37)

    @jax.jit
    def decode(ins):
        def body(state, x):
            q, k, v, g, beta = x
            if fam == DN:
                o, state = delta_rule_step(q, k, v, state, beta=beta)
            else:
                o, state = gated_delta_rule_step(q, k, v, state, beta=beta, g=g)
            return state, o
        xs = tuple(jnp.moveaxis(ins[n], 1, 0) for n in ("q", "k", "v", "g", "beta"))
        state, o = jax.lax.scan(body, ins["h0"], xs)
        return jnp.moveaxis(o, 0, 1), state

    o_d, s_d = decode(ins)
    o, s = _fwd_fn(fam, 16)(ins, None)
    assert_close(o_d, o, name="o")
    assert_close(s_d, s, name="final_state")


def test_gdn_with_zero_gate_is_delta_rule():
    ins = make_inputs(8, t=37)
    ins["g"] = jnp.zeros_like(ins["g"])
    (o, s), g_gdn = compare(GDN, ins, 16)
    do, dsf = cotangents(ins)
    (o_dn, s_dn), g_dn = _vjp_fn(DN, "xla", 16)(ins, None, do, dsf)
    assert_close(o, o_dn, name="o")
    assert_close(s, s_dn, name="final_state")
    for name, a, r in zip(("dq", "dk", "dv", "dbeta", "dh0"), g_gdn[:3] + g_gdn[4:], g_dn):
        assert_close(a, r, role=ROLE[name], name=name)


# ----------------------------------------------------------------------------- SP summary


@pytest.mark.parametrize("with_segments", [False, True])
def test_summary_identity(with_segments):
    ins = make_inputs(9, t=64)
    seg = seg_from_lengths((40, 24), (64,)) if with_segments else None
    m, s_ext = jax.jit(functools.partial(_delta_chunk.chunk_summary, chunk_size=16))(
        ins["k"], ins["v"], ins["beta"], ins["g"], segment_ids=seg)
    _, s = _fwd_fn(GDN, 16)(ins, seg)
    assert_close(jnp.einsum("bhde,bhev->bhdv", m, ins["h0"]) + s_ext, s, name="M h0 + S_ext")
    if with_segments:  # row 0 has a reset: its end state forgets h0
        assert float(jnp.max(jnp.abs(m[0]))) == 0.0
    if not with_segments:  # composing two halves' summaries = the whole input's summary
        summ = jax.jit(functools.partial(_delta_chunk.chunk_summary, chunk_size=16))
        (m1, s1), (m2, s2) = (summ(ins["k"][:, sl], ins["v"][:, sl], ins["beta"][:, sl], ins["g"][:, sl])
                              for sl in (slice(0, 29), slice(29, 64)))
        assert_close(m2 @ m1, m, name="M2 M1")
        assert_close(m2 @ s1 + s2, s_ext, name="M2 S1 + S2")


def test_summary_reset_at_first_token_drops_initial_state():
    ins = make_inputs(10, t=20)
    resets = jnp.zeros((2, 20), bool).at[:, 0].set(True)
    summ = jax.jit(functools.partial(_delta_chunk.chunk_summary, chunk_size=8))
    m, _ = summ(ins["k"], ins["v"], ins["beta"], ins["g"], resets=resets)
    assert float(jnp.max(jnp.abs(m))) == 0.0


# ----------------------------------------------------------------------------- stress


@pytest.mark.parametrize("z", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("beta_mode", ["near0", "near1", "upto2"])
def test_gate_stress(z, beta_mode):
    ins = make_inputs(11, t=64, z=z, beta_mode=beta_mode)
    ins["g"] = ins["g"].at[:, ::5].set(0.0)  # some gates exactly 0
    compare(GDN, ins, 32)


def test_full_forget_gate():
    ins = make_inputs(12, t=37)
    ins["g"] = ins["g"].at[:, 10].set(-jnp.inf)
    compare(GDN, ins, 16)


def test_long_sequence_stays_finite():
    ins = make_inputs(13, b=1, t=1000, h=1, dk=16, dv=16, beta_mode="upto2")
    (o, s), grads = compare(GDN, ins, 64)
    for x in (o, s) + tuple(grads):
        assert bool(jnp.all(jnp.isfinite(x)))


def test_features_have_effect():
    ins = make_inputs(14, t=37)
    o, _ = _fwd_fn(GDN, 16)(ins, None)
    changed = dict(ins, beta=ins["beta"] * 0.5)
    assert_not_close(_fwd_fn(GDN, 16)(changed, None)[0], o, name="beta")
    changed = dict(ins, g=ins["g"] * 2.0)
    assert_not_close(_fwd_fn(GDN, 16)(changed, None)[0], o, name="g")
    assert_not_close(_fwd_fn(GDN, 16)(ins, seg_from_lengths((20, 17), (5, 32)))[0], o, name="segment_ids")
    assert_not_close(_fwd_fn(DN, 16)(ins, None)[0], o, name="gate vs no gate")
    scaled = jax.jit(lambda x: delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=0.1, chunk_size=16))
    assert_not_close(scaled(ins), _fwd_fn(DN, 16)(dict(ins, h0=0.0 * ins["h0"]), None)[0], name="scale")


def test_deterministic():
    ins = make_inputs(15, t=37)
    do, dsf = cotangents(ins)
    a = _vjp_fn(GDN, "xla", 16)(ins, None, do, dsf)
    b = _vjp_fn(GDN, "xla", 16)(ins, None, do, dsf)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- API


def test_dispatch_and_registry():
    ins = make_inputs(16, t=37)
    for fam, op, args in ((DN, delta_rule, (ins["q"], ins["k"], ins["v"], ins["beta"])),
                          (GDN, gated_delta_rule, (ins["q"], ins["k"], ins["v"], ins["g"], ins["beta"]))):
        family = _registry.get_family(fam)
        assert set(family.implementations) >= {"reference", "xla"}
        assert not family.implementations["reference"].auto
        text = _registry.explain(op, *args, chunk_size=64)
        assert "run  xla (chunk_size=37, requested 64 > seq)" in text, text
        assert "impl" in str(__import__("inspect").signature(op))
    o = jax.jit(lambda x: delta_rule(x["q"], x["k"], x["v"], x["beta"]))(ins)  # impl=None
    assert o.shape == (2, 37, 2, 16) and o.dtype == jnp.float32


def test_bad_inputs_raise():
    ins = make_inputs(17, t=8)
    q, k, v, g, beta = ins["q"], ins["k"], ins["v"], ins["g"], ins["beta"]
    cases = [
        (lambda: delta_rule(q[0], k, v, beta), "q must have rank 4"),
        (lambda: delta_rule(q, k, v[..., 0], beta), "v must have rank 4"),
        (lambda: delta_rule(q, k, v, beta[..., None]), "beta must have shape"),
        (lambda: delta_rule(q, k, v, beta[:, :4]), "beta must have shape"),
        (lambda: delta_rule(q, k, v, None), "beta"),
        (lambda: delta_rule(q, k, v, beta * 3.0), "beta must lie in"),
        (lambda: delta_rule(q, k, v, -beta), "beta must lie in"),
        (lambda: gated_delta_rule(q, k, v, g[..., None], beta), "g (log-space gate) must have shape"),
        (lambda: gated_delta_rule(q, k, v, -g, beta), "must be <= 0"),
        (lambda: gated_delta_rule(q, k, v, None, beta), "g (log decay"),
        (lambda: delta_rule(q, k, v, beta, initial_state=ins["h0"][:, :1]), "initial_state must have shape"),
        (lambda: delta_rule(q, k, v, beta, chunk_size=0), "chunk_size"),
        (lambda: delta_rule(q, k, v, beta, segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids"),
        (lambda: delta_rule_step(q[:, 0], k[:, 0], v[:, 0], None, beta=beta[:, 0, :1]), "beta must have shape"),
        (lambda: gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], None, beta=beta[:, 0], g=None), "g (this token"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=__import__("re").escape(match)):
            fn()


@pytest.mark.parametrize("fam", [DN, GDN])
def test_groups_of_chunks_match_the_reference(fam, monkeypatch):
    """Long inputs run the chunked form group by group, carrying the state forward and its gradient backward:
    here 4 groups of 3 chunks of 8 (the last one partly padding), segments that cross group boundaries and an
    initial state; output, final state and VJP against the token-loop reference."""
    ins = make_inputs(3, t=85)
    seg = seg_from_lengths([30, 1, 40, 14], [60, 25])
    monkeypatch.setattr(_delta_chunk, "GROUP_ROW_TOKENS", 2 * 2 * 24)  # B·H = 4 rows: 24 tokens per group
    assert _chunk_groups.plan(85, 8, 4, _delta_chunk.GROUP_ROW_TOKENS) == (24, 4)
    compare(fam, ins, 8, seg, fresh=True)


def test_group_plan(monkeypatch):
    """Groups of about row_tokens / rows tokens, balanced; one group below MIN_GROUPS groups or off CPU."""
    assert _chunk_groups.plan(85, 8, 4, 96) == (24, 4)  # 11 chunks in groups of 3: 4 groups, 1 chunk padding
    assert _chunk_groups.plan(8192, 64, 4, 4096) == (1024, 8)
    assert _chunk_groups.plan(1000, 64, 4, 4096) == (1024, 1)  # 16 chunks: one group
    assert _chunk_groups.plan(2048, 64, 4, 4096) == (2048, 1)  # two groups would be: run as one
    assert _chunk_groups.plan(3000, 64, 4, 4096) == (1024, 3)  # 47 chunks: 3 groups of 16 (one chunk padding)
    monkeypatch.setattr(_chunk_groups._target, "platform", lambda: "tpu")
    assert _chunk_groups.plan(8192, 64, 4, 4096) == (8192, 1)
