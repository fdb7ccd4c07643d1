"""Conformance checks for one recurrent family record and one implementation (FAMILIES.md §5.4).

Everything comes from the record: the op, its argument specs (which arguments are positional, which
are per-token, which receive gradients), its state structure, its decode step and its input factory.
So a new family (the toy family in ``test_new_family.py`` included) is checked with no edit here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix import testing
from seqmix.ops import _registry
from tests.ops.attention_cases import packed_segments

T, CHUNK = 75, 32  # three chunks, a partial tail
SEGMENTS = (1, 31, 32, 5)  # documents ending at 1, 32 (a chunk boundary), 64 (boundary), 69; then 6 tokens
# Against the reference: documents ending at 1, 32 (a chunk boundary) and 52; the last runs from 52 across the
# boundary at 64 to the end, so a chunk without a reset carries a decayed state (at chunk 32 and at 64): the
# chunk-to-chunk decay and its gradient are checked, which a reset in every chunk would hide.
REFERENCE_SEGMENTS = (1, 31, 20)


def segment_ids(b: int, t: int, lengths=SEGMENTS):
    return packed_segments(b, t, list(lengths))


def _diff_names(fam: _registry.Family, inputs: _registry.Inputs):
    """Names of the array arguments that receive a gradient, positional first."""
    pos = [a for a in fam.positional]
    kw = [n for n in inputs.arrays if n == "initial_state" or fam.arg(n).differentiable]
    return pos, kw


def _vjp_run(fam, impl, inputs: _registry.Inputs, seg, cts, chunk=CHUNK):
    """(o, state) and the gradients of every differentiable array, as dicts, under one jit."""
    pos_names, kw_names = _diff_names(fam, inputs)
    q, k, v = inputs.args[:3]
    pos = dict(zip(pos_names, inputs.args[3:]))
    fixed = {n: x for n, x in inputs.arrays.items() if n not in kw_names}
    diff = {"q": q, "k": k, "v": v, **pos, **{n: inputs.arrays[n] for n in kw_names}}

    @jax.jit
    def go(diff, cts):
        def f(d):
            args = [d["q"], d["k"], d["v"]] + [d[n] for n in pos_names]
            return fam.op(*args, **{n: d[n] for n in kw_names}, **fixed, **inputs.options, segment_ids=seg,
                          chunk_size=chunk, return_state=True, impl=impl)
        out, vjp = jax.vjp(f, diff)
        return out, vjp(cts)[0]

    return go(diff, cts)


def _cotangents(key, o_shape, o_dtype, state_shape):
    kd, ks = jax.random.split(key)
    return (jax.random.normal(kd, o_shape, jnp.float32).astype(o_dtype), jax.random.normal(ks, state_shape, jnp.float32))


def check_against_reference(fam, impl, *, dtype=jnp.float32, regime="stress", seed=0, batch=1, head_dim=16):
    """Forward (o, final_state) and VJP (dq, dk, dv, every gate/β gradient, d initial_state) of ``impl`` vs
    the reference: T = 75 over 32-row chunks, packed documents (:data:`REFERENCE_SEGMENTS`: the last one
    spans a chunk boundary, so a decayed state crosses it), an initial state, random cotangents on o
    and final_state; fp32 or bf16 tolerances (FAMILIES.md §5.3)."""
    kind = "fp32" if jnp.dtype(dtype) == jnp.float32 else "recurrent_bf16"
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(seed), batch=batch, seq=T, heads=2, dk=head_dim,
                             dv=head_dim, dtype=dtype, regime=regime)
    seg = segment_ids(batch, T, REFERENCE_SEGMENTS)
    call = fam.prepare(*inputs.args, **inputs.arrays, **inputs.options, segment_ids=seg, chunk_size=CHUNK)
    reason = fam.implementations[impl].supports(call)
    assert reason is None, f"{fam.name}/{impl} refuses the conformance call: {reason}"
    state = fam.state(call)
    cts = _cotangents(jax.random.PRNGKey(seed + 7), inputs.args[2].shape, dtype, state.shape)
    (o, s), grads = _vjp_run(fam, impl, inputs, seg, cts)
    (o_r, s_r), grads_r = _vjp_run(fam, "reference", inputs, seg, cts)
    assert o.dtype == jnp.dtype(dtype) and s.dtype == jnp.float32, (o.dtype, s.dtype)
    testing.assert_shape(s, state.shape)
    testing.assert_finite((o, s, grads), f"{fam.name}/{impl} outputs and gradients")
    testing.assert_close(o, o_r, kind=kind, role="out", name="o")
    testing.assert_close(s, s_r, kind=kind, role="out", name="final_state")
    roles = {n: ("grad" if n in ("q", "k", "v", "initial_state") else "gate") for n in grads}
    testing.assert_trees_close(grads, grads_r, kind=kind, role=roles, name="grads")


def _doc_slices(lengths, t):
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    bounds.append((start, t))
    return bounds


def _slice_inputs(fam, inputs, a, b):
    """The inputs restricted to tokens [a, b) (per-token arrays sliced on axis 1), no initial state."""
    per_token = {x.name for x in fam.per_token}
    pos = [x[:, a:b] if name in per_token else x for name, x in zip(fam.positional, inputs.args[3:])]
    arrays = {n: (x[:, a:b] if n in per_token else x) for n, x in inputs.arrays.items() if n != "initial_state"}
    return [x[:, a:b] for x in inputs.args[:3]] + pos, arrays


def check_packed_equals_per_document(fam, impl, seed=1):
    """One packed row equals one call per document (outputs; the row's final state is the last document's)."""
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(seed), batch=1, seq=T, heads=2, dk=8, dv=8)
    seg = segment_ids(1, T)
    args, arrays = _slice_inputs(fam, inputs, 0, T)
    o, s = fam.op(*args, **arrays, **inputs.options, segment_ids=seg, chunk_size=CHUNK, return_state=True,
                  impl=impl)
    for a, b in _doc_slices(SEGMENTS, T):
        d_args, d_arrays = _slice_inputs(fam, inputs, a, b)
        o_d, s_d = fam.op(*d_args, **d_arrays, **inputs.options, chunk_size=CHUNK, return_state=True, impl=impl)
        testing.assert_close(o[:, a:b], o_d, role="out", name=f"o[{a}:{b}]")
    testing.assert_close(s, s_d, role="out", name="final_state (last document)")


def check_chained_halves(fam, impl, split=37, seed=2):
    """[x1; x2] in one call equals x1 then x2 with initial_state = final_state(x1) (split inside a chunk)."""
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(seed), batch=2, seq=T, heads=2, dk=8, dv=8)
    h0 = inputs.arrays["initial_state"]
    args, arrays = _slice_inputs(fam, inputs, 0, T)
    o, s = fam.op(*args, **arrays, **inputs.options, initial_state=h0, chunk_size=CHUNK, return_state=True,
                  impl=impl)
    a1, r1 = _slice_inputs(fam, inputs, 0, split)
    a2, r2 = _slice_inputs(fam, inputs, split, T)
    o1, s1 = fam.op(*a1, **r1, **inputs.options, initial_state=h0, chunk_size=CHUNK, return_state=True, impl=impl)
    o2, s2 = fam.op(*a2, **r2, **inputs.options, initial_state=s1, chunk_size=CHUNK, return_state=True, impl=impl)
    testing.assert_close(jnp.concatenate([o1, o2], axis=1), o, role="out", name="o")
    testing.assert_close(s2, s, role="out", name="final_state")


def check_decode_matches_parallel(fam, seed=3, t=21):
    """Iterating the record's decode step token by token equals the parallel form (o and final state)."""
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(seed), batch=2, seq=t, heads=2, dk=8, dv=8)
    h0 = inputs.arrays["initial_state"]
    args, arrays = _slice_inputs(fam, inputs, 0, t)
    o, s = fam.op(*args, **arrays, **inputs.options, initial_state=h0, return_state=True, impl="reference")
    per_token = {x.name for x in fam.per_token}
    named = dict(zip(fam.positional, args[3:]))
    named.update(arrays)
    state, outs = h0, []
    for i in range(t):
        step_args = {n: (x[:, i] if n in per_token else x) for n, x in named.items()}
        o_t, state = fam.decode(args[0][:, i], args[1][:, i], args[2][:, i], state, **step_args, **inputs.options)
        outs.append(o_t)
    testing.assert_close(jnp.stack(outs, axis=1), o, role="out", name="o (decode)")
    testing.assert_close(state, s, role="out", name="state (decode)")
