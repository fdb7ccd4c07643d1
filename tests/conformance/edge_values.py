"""Edge-value inputs for every registered family, and the rule each implementation must follow there.

Generated from the family records (argument specs and input factories), like the rest of the suite.
The rules (FAMILIES.md §5.5):

* **non-finite inputs are never masked away**: every output entry that is non-finite in the reference
  is non-finite in the implementation, and every entry both keep finite agrees within the fp32
  tolerance. An implementation may spread a NaN further than the reference (``0·NaN`` inside a block
  or chunk matmul is NaN): that is loud, not silently wrong;
* **extreme but valid inputs** (gates at ``-inf`` and huge negative values, very large logits, soft cap,
  fully masked rows, length-1 sequences) give finite results equal to the reference's, forward and VJP;
* **an empty sequence** is a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.ops import _registry
from seqmix.ops import masks as M

T, CHUNK = 40, 16  # recurrent: three chunks with a partial tail
T_ATTN, BLOCK = 72, 16  # attention: five xla blocks with a partial tail (the TPU kernel serves q length >= 65)
HARD_GATES = (-jnp.inf, -1e30, -1e4, -100.0)  # hard resets and near-resets


@dataclasses.dataclass(frozen=True)
class Case:
    """One edge-value call: ``args``/``kwargs`` for the op, compared with the reference forward and VJP;
    or, with ``poison``, the same call with a few entries made non-finite (forward only)."""

    name: str
    args: tuple
    kwargs: dict
    poison: tuple = ()  # ((argument index, entry index, non-finite value), ...) set into a clean input
    kind: str = "fp32"


def _recurrent_base(fam, seq=T, dtype=jnp.float32):
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(11), batch=1, seq=seq, heads=2, dk=8, dv=8, dtype=dtype,
                             regime="typical")
    kwargs = {**inputs.arrays, **inputs.options, "chunk_size": CHUNK, "return_state": True}
    return list(inputs.args), kwargs


def _set(x, index, value):
    return x.at[index].set(jnp.asarray(value, x.dtype))


def _gate_names(fam):
    return [a.name for a in fam.args if a.gate is not None and a.role in ("sequence", "per_head")]


def _with_hard_gates(fam, args, kwargs):
    """Every gate argument with -inf, -1e30, -1e4, -100 at scattered tokens (per-head gates: one head -inf)."""
    args, kwargs = list(args), dict(kwargs)
    positional = list(fam.positional)
    for name in _gate_names(fam):
        spec = fam.arg(name)
        x = args[3 + positional.index(name)] if name in positional else kwargs[name]
        if spec.role == "per_head":
            x = _set(x, (1,), -jnp.inf)
        else:
            for i, val in enumerate(HARD_GATES):  # tokens 3, 12, 21, 30: every chunk, both heads
                x = _set(x, (0, 3 + 9 * i, i % 2), val)
            x = _set(x, (0, 17), -jnp.inf)  # every head (and channel) of one token
        if name in positional:
            args[3 + positional.index(name)] = x
        else:
            kwargs[name] = x
    return tuple(args), kwargs


# One entry each: a NaN query (token 5, head 0), an inf key (token 12, kv head 1), a NaN value (token 20,
# kv head 0). They reach disjoint outputs, so one call checks all three.
POISONS = ((0, (0, 5, 0, 0), jnp.nan), (1, (0, 12, 1, 2), jnp.inf), (2, (0, 20, 0, 1), jnp.nan))


def recurrent_cases(fam) -> list[Case]:
    args, kw = _recurrent_base(fam)
    cases = [Case("non_finite", tuple(args), kw, poison=POISONS)]
    if _gate_names(fam):
        hard_args, hard_kw = _with_hard_gates(fam, args, kw)
        cases.append(Case("hard_gates", hard_args, hard_kw))
    one_args, one_kw = _recurrent_base(fam, seq=1)
    cases.append(Case("length_1", tuple(one_args), one_kw))
    b_args, b_kw = _recurrent_base(fam, dtype=jnp.bfloat16)  # large bf16 queries: fp32 accumulation holds them
    cases.append(Case("bf16_large_q", (b_args[0] * jnp.bfloat16(1e4),) + tuple(b_args[1:]), b_kw,
                      kind="recurrent_bf16"))
    return cases


def _has(fam, name: str) -> bool:
    return any(a.name == name for a in fam.args)


# Softmax cases in order, with the op arguments each needs (neighborhood attention has no mask, sink or
# soft-cap argument: its mask is built in).
SOFTMAX_CASES = (("non_finite", ()), ("large_logits", ()), ("length_1", ()), ("bf16_large_q", ()),
                 ("masked_rows", ("mask",)), ("masked_rows_sinks", ("mask", "sink_logits")),
                 ("soft_cap_large_logits", ("soft_cap",)))


def _softmax_case_names(fam) -> list[str]:
    return [name for name, needs in SOFTMAX_CASES if all(_has(fam, a) for a in needs)]


def attention_cases(fam) -> list[Case]:
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(12), batch=1, seq=T_ATTN, heads=4, dk=8, dv=8)
    q, k, v = inputs.args
    kw = {**inputs.options, "return_lse": True, "block_q": BLOCK, "block_kv": BLOCK}
    if _has(fam, "mask"):
        kw["mask"] = M.Causal()
    one = fam.make_inputs(fam, jax.random.PRNGKey(12), batch=1, seq=1, heads=4, dk=8, dv=8).options
    rows = np.tril(np.ones((T_ATTN, T_ATTN), bool))
    rows[3:7] = False  # four fully masked query rows inside the first block
    # per head: a sink, no sink (-inf), a sink that swamps every key, one that never matters
    sinks = jnp.array([2.0, -jnp.inf, 1e4, -1e4])
    cases = {c.name: c for c in (
        Case("non_finite", (q, k, v), kw, poison=POISONS),
        Case("large_logits", (q * 1e3, k, v), kw),
        Case("length_1", (q[:, :1], k[:, :1], v[:, :1]), {**kw, **one}),
        Case("bf16_large_q", (q.astype(jnp.bfloat16) * jnp.bfloat16(100), k.astype(jnp.bfloat16),
                              v.astype(jnp.bfloat16)), kw, kind="softmax_bf16"),
        Case("masked_rows", (q, k, v), {**kw, "mask": M.Explicit(rows)}),
        Case("masked_rows_sinks", (q, k, v), {**kw, "mask": M.Explicit(rows), "sink_logits": sinks}),
        Case("soft_cap_large_logits", (q * 1e4, k, v), {**kw, "soft_cap": 20.0}),
    )}
    return [cases[name] for name in _softmax_case_names(fam)]


@functools.lru_cache(maxsize=None)
def _cases(name: str) -> tuple[Case, ...]:
    fam = _registry.get_family(name)
    return tuple(attention_cases(fam) if fam.kind == "softmax" else recurrent_cases(fam))


def case(fam, name: str) -> Case:
    return next(c for c in _cases(fam.name) if c.name == name)


def case_names(fam) -> list[str]:
    """The names of the family's cases, without building the arrays (for test collection)."""
    if fam.kind == "softmax":
        return _softmax_case_names(fam)
    return ["non_finite"] + (["hard_gates"] if _gate_names(fam) else []) + ["length_1", "bf16_large_q"]


def empty_call(fam) -> tuple[tuple, dict]:
    """The family's arguments with the sequence axis cut to length 0."""
    if fam.kind == "softmax":
        inputs = fam.make_inputs(fam, jax.random.PRNGKey(0), batch=1, seq=4, heads=2, dk=8, dv=8)
        return tuple(x[:, :0] for x in inputs.args), {**inputs.options, **({"mask": M.Causal()} if _has(fam, "mask") else {})}
    args, kw = _recurrent_base(fam, seq=4)
    per_token = {a.name for a in fam.per_token}
    pos = [x[:, :0] if n in per_token else x for n, x in zip(fam.positional, args[3:])]
    kw = {n: (x[:, :0] if n in per_token else x) for n, x in kw.items() if n != "initial_state"}
    return tuple(x[:, :0] for x in args[:3]) + tuple(pos), kw


# ----------------------------------------------------------------------------- the checks


def _floating(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _vjp(op, case: Case, impl: str):
    """Outputs and the gradients of every floating array argument (a dict: ``arg0``.. for positional
    arguments, names for keywords) for random cotangents."""
    diff = {f"arg{i}": x for i, x in enumerate(case.args) if _floating(x)}
    diff.update({n: x for n, x in case.kwargs.items() if _floating(x)})

    def f(d):
        args = [d.get(f"arg{i}", x) for i, x in enumerate(case.args)]
        return op(*args, **{**case.kwargs, **{n: x for n, x in d.items() if not n.startswith("arg")}}, impl=impl)

    out_shape = jax.eval_shape(f, diff)
    rng = np.random.default_rng(5)  # cotangents drawn outside the jit: in-graph threefry costs seconds to compile
    cts = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), out_shape)

    @jax.jit
    def run(diff, cts):
        out, pullback = jax.vjp(f, diff)
        # zero cotangents where the output is not finite (the lse of a fully masked row)
        cts = jax.tree_util.tree_map(lambda o, c: jnp.where(jnp.isfinite(o), c, 0).astype(c.dtype), out, cts)
        (grads,) = pullback(cts)
        return out, grads

    return run(diff, cts)


def _jitted(op, kwargs, impl: str):
    """``op(*args, **kwargs, impl=impl)`` as one jitted function of ``args`` (array keywords traced)."""
    arrays = {n: x for n, x in kwargs.items() if isinstance(x, jax.Array)}
    static = {n: x for n, x in kwargs.items() if n not in arrays}
    fn = jax.jit(lambda a, kw: jax.tree_util.tree_leaves(op(*a, **kw, **static, impl=impl)))
    return lambda args: [np.asarray(jnp.asarray(x, jnp.float32)) for x in fn(tuple(args), arrays)]


@functools.lru_cache(maxsize=None)
def _poisoned_reference(family: str, name: str):
    """(reference on the clean input, dependent entries, reference on the poisoned input, poisoned args)."""
    fam = _registry.get_family(family)
    c = case(fam, name)
    ref_fn = _jitted(fam.op, c.kwargs, "reference")
    ref_clean = ref_fn(c.args)
    dep = [np.zeros(r.shape, bool) for r in ref_clean]
    poisoned = list(c.args)
    for i, index, value in c.poison:
        moved = list(c.args)
        moved[i] = moved[i].at[index].add(1.0)
        dep = [d | (a != b) for d, a, b in zip(dep, ref_fn(moved), ref_clean)]
        poisoned[i] = poisoned[i].at[index].set(value)
    return ref_clean, dep, ref_fn(poisoned), poisoned


def _check_poisoned(fam, impl: str, case: Case, label: str) -> None:
    """Outputs that depend on a non-finite input (the reference changes when that entry, clean, moves by 1)
    and that the reference makes non-finite are non-finite (an inf key can legitimately drop out of a
    softmax as a -inf logit); every other finite output equals the reference (on the clean input where
    the reference itself spread a NaN through ``0·NaN``)."""
    ref_clean, dep, ref, poisoned = _poisoned_reference(fam.name, case.name)
    out = _jitted(fam.op, case.kwargs, impl)(poisoned)
    for n, (o, r, rc, d) in enumerate(zip(out, ref, ref_clean, dep)):
        must = d & ~np.isfinite(r)
        assert must.any() or not d.any(), f"{label} output {n}: the reference keeps every dependent entry finite"
        lost = must & np.isfinite(o)
        if lost.any():
            first = np.argwhere(lost)[0].tolist()
            raise AssertionError(f"{label} output {n}: {int(lost.sum())} of {int(must.sum())} entries that depend "
                                 f"on a non-finite input are finite (first at {first}: {o[tuple(first)]})")
        keep = ~must & np.isfinite(o)
        expected = np.where(np.isfinite(r), r, rc)
        testing.assert_close(np.where(keep, o, 0.0), np.where(keep, expected, 0.0),
                             name=f"{label} output {n} (entries left finite)")


@functools.lru_cache(maxsize=None)
def _reference_vjp_cached(family: str, name: str):
    fam = _registry.get_family(family)
    return _vjp(fam.op, case(fam, name), "reference")


def _reference_vjp(fam, c: Case):
    """The reference's outputs and gradients, computed once per process for every implementation."""
    return _reference_vjp_cached(fam.name, c.name)


def _reference_out(fam, c: Case):
    return jax.tree_util.tree_leaves(_reference_vjp(fam, c)[0])


def check_case(fam, impl: str, case: Case, grads: bool = True) -> None:
    label = f"{fam.name}/{impl}/{case.name}"
    reason = fam.implementations[impl].supports(fam.prepare(*case.args, **case.kwargs))
    if reason is not None:  # a refused call must fail loudly, never fall back silently
        with pytest.raises(NotImplementedError, match="no implementation can serve"):
            fam.op(*case.args, **case.kwargs, impl=impl)
        return
    if case.poison:
        _check_poisoned(fam, impl, case, label)
        return
    if not grads:
        out = _jitted(fam.op, case.kwargs, impl)(case.args)
        ref = _reference_out(fam, case)
        testing.assert_trees_close(out, ref, kind=case.kind, role="out", name=f"{label} outputs")
        return
    (out, g), (ref, g_ref) = _vjp(fam.op, case, impl), _reference_vjp(fam, case)
    testing.assert_trees_close(out, ref, kind=case.kind, role="out", name=f"{label} outputs")
    testing.assert_finite(g, f"{label} gradients")
    roles = {n: ("grad" if n in ("0", "1", "2", "initial_state") else "gate") for n in g}
    testing.assert_trees_close(g, g_ref, kind=case.kind, role=roles, name=f"{label} gradients")


# ----------------------------------------------------------------------------- test cells

# The interpreter simulates every kernel step (seconds per call): there, the cases that reach the kernels'
# own numerics (NaN propagation, hard gates and masked rows with sinks, the last two with gradients).
INTERPRET_CASES = ("non_finite", "hard_gates", "masked_rows_sinks")
GRAD_IN_INTERPRET = ("hard_gates", "masked_rows_sinks")


def params(modes):
    """pytest params ``(family, impl, mode, case)`` for every plan cell in ``modes`` and its cases."""
    from tests.conformance import plan

    out = []
    for family, impl, mode in plan.cells(modes=modes):
        interpreted = mode.endswith(":interpret")
        marks = [pytest.mark.interpret] if interpreted else []
        for name in case_names(_registry.get_family(family)):
            if interpreted and name not in INTERPRET_CASES:
                continue
            out.append(pytest.param(family, impl, mode, name, id=f"{family}-{impl}-{mode}-{name}", marks=marks))
    return out


def run_cell(family: str, impl: str, mode: str, name: str) -> None:
    from tests.conformance import plan

    fam = _registry.get_family(family)
    with plan.mode_context(mode):
        check_case(fam, impl, case(fam, name), grads=mode == "cpu" or name in GRAD_IN_INTERPRET)
