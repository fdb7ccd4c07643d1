"""The conformance runner (forward and VJP against the family's reference) and the recorded device results."""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqmix import ops, testing
from seqmix.ops import _registry
from seqmix.ops.gpu import device_results

from .budget import Budget, Output, log
from .cases import _normal, family_cases
from .common import RECURRENT_SPEC, SCRIPT, _short, gpu_impls, run_problem


def _is_float_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _differentiable(fam: _registry.Family, name: str, x) -> bool:
    if not _is_float_array(x):
        return False
    if name in ("q", "k", "v", "initial_state"):
        return True
    try:
        return fam.arg(name).differentiable
    except KeyError:
        return True


def op_function(fam: _registry.Family, impl: str, args: tuple, kwargs: dict):
    """``(f, diff)``: ``f(diff) = op(..., impl=impl)`` over the differentiable arrays ``diff`` (a dict)."""
    names = ("q", "k", "v") + fam.positional
    names = names[:len(args)]
    diff = {n: a for n, a in zip(names, args) if _differentiable(fam, n, a)}
    diff.update({n: a for n, a in kwargs.items() if _differentiable(fam, n, a)})
    fixed_pos = {n: a for n, a in zip(names, args) if n not in diff}
    fixed_kw = {n: a for n, a in kwargs.items() if n not in diff}

    def f(d):
        a = [d[n] if n in d else fixed_pos[n] for n in names]
        kw = dict(fixed_kw, **{n: d[n] for n in kwargs if n in d})
        return fam.op(*a, **kw, impl=impl)

    return f, diff


def vjp_run(fam, impl: str, args, kwargs, key):
    """``(outputs, gradients of every differentiable array (a dict), cotangents)``: one jit, random
    cotangents drawn from ``key``."""
    f, diff = op_function(fam, impl, args, kwargs)
    shapes = jax.eval_shape(f, diff)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(key, max(1, len(leaves)))
    cts = jax.tree_util.tree_unflatten(tree, [_normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])

    @jax.jit
    def go(d, c):
        out, pull = jax.vjp(f, d)
        return out, pull(c)[0]

    out, grads = jax.block_until_ready(go(diff, cts))
    return out, grads, cts


def _output_names(fam, out) -> list[tuple[str, Any]]:
    if not isinstance(out, (tuple, list)):
        return [("o", out)]
    second = "lse" if fam.kind == "softmax" else "final_state"
    return [("o", out[0]), (second, out[1])] + [(f"out{i}", x) for i, x in enumerate(out[2:], 2)]


def compare(fam, q_dtype, out, grads, out_ref, grads_ref) -> tuple[list[str], dict]:
    """seqmix.testing's tolerances for every output and gradient: (failure messages, errors per tensor)."""
    kind = testing.tolerance_kind(q_dtype, fam.kind)
    problems, errs = [], {}
    pairs = [(n, x, r, "out") for (n, x), (_, r) in zip(_output_names(fam, out), _output_names(fam, out_ref))]
    pairs += [(f"d{n}", grads[n], grads_ref[n], "grad" if n in ("q", "k", "v", "initial_state") else "gate")
              for n in grads]
    o = _output_names(fam, out)[0][1]
    if jnp.dtype(o.dtype) != jnp.dtype(q_dtype):
        problems.append(f"o dtype {o.dtype} != input dtype {q_dtype}")
    for name, x, r, role in pairs:
        msg = testing.check_close(x, r, kind=kind, role=role, name=name)
        rms, rmax, max_abs = testing.errors(x, r)
        errs[name] = dict(rms=rms, rmax=rmax, max_abs=max_abs)
        if msg:
            problems.append(msg)
    return problems, errs


def run_conformance(output: Output, budget: Budget, deadline: float, smoke: bool, families=None) -> None:
    """Every GPU implementation (in the smoke run, ``xla`` as a stand-in) on its family's cases."""
    plan = []  # (case, [impl names])
    for name in sorted(ops.FAMILIES):
        fam = ops.FAMILIES[name]
        if families and name not in families:
            continue
        impls = gpu_impls(fam)
        if smoke and name in ("attention",) + RECURRENT_SPEC["families"]:
            impls = impls + ["xla"]  # the stand-in that runs on CPU
        if impls:
            plan += [(c, impls) for c in family_cases(fam, smoke)]
    plan.sort(key=lambda p: p[0].tier)  # stable: every family's tier 1 first
    total = sum(len(i) for _, i in plan)
    log(budget, f"conformance: {len(plan)} cases, {total} (case, implementation) runs, "
                f"{budget.left(deadline):.0f} s for it")
    device_kind = jax.devices()[0].device_kind
    done = 0
    for index, (case, impls) in enumerate(plan):
        fam = ops.FAMILIES[case.family]
        key = jax.random.PRNGKey(1000 + index)
        ref_result = None
        try:
            args, kwargs = case.build(key)
            call = fam.prepare(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            for impl in impls:
                output.cases.append(dict(family=case.family, impl=impl, case=case.desc, tier=case.tier,
                                         key=None, status="failed", error=f"building the inputs: {_short(err)}"))
            continue
        for impl_name in impls:
            done += 1
            impl = fam.implementations[impl_name]
            entry = dict(family=case.family, impl=impl_name, case=case.desc, tier=case.tier, key=None)
            reason = run_problem(impl, call, smoke)
            if reason:
                output.cases.append(dict(entry, status="skipped", reason=reason))
                continue
            try:
                entry["key"] = impl.device_case(call) if impl.device_case else device_results.ANY_CASE
            except Exception as err:  # noqa: BLE001
                output.cases.append(dict(entry, status="failed", error=f"device_case(): {_short(err)}"))
                continue
            if budget.left(deadline) <= 0:
                output.cases.append(dict(entry, status="skipped", reason="time budget"))
                continue
            t0 = time.monotonic()
            try:
                if ref_result is None:  # the reference's fp32 matmuls at full precision (no TF32); the
                    # implementation under test runs with the defaults a user gets
                    with jax.default_matmul_precision("highest"):
                        ref_result = vjp_run(fam, case.ref, args, kwargs, jax.random.fold_in(key, 1))[:2]
                out, grads, _ = vjp_run(fam, impl_name, args, kwargs, jax.random.fold_in(key, 1))
                problems, errs = compare(fam, args[0].dtype, out, grads, *ref_result)
                status = "failed" if problems else "passed"
                output.cases.append(dict(entry, status=status, versus=case.ref, errors=errs,
                                         seconds=round(time.monotonic() - t0, 2),
                                         **({"error": "; ".join(problems)} if problems else {})))
            except Exception as err:  # noqa: BLE001 - a crash is a failure, never a pass
                output.cases.append(dict(entry, status="failed", versus=case.ref, error=_short(err, 1500),
                                         seconds=round(time.monotonic() - t0, 2)))
            last = output.cases[-1]
            log(budget, f"  [{done}/{total}] {case.family}/{impl_name} {case.desc} [{entry['key']}]: "
                        f"{last['status']}" + (f" ({last['error'][:200]})" if last["status"] == "failed" else ""))
        output.write()
    record_results(output, device_kind, smoke)
    output.write()


def record_results(output: Output, device_kind: str, smoke: bool) -> None:
    """Group the runs by (family, impl, key), the implementation's own equivalence class of calls: a key is
    recorded when a call of it passed here and none failed (calls the time budget cut are named in the
    entry's ``test``; a failure anywhere in the key records nothing)."""
    groups: dict[tuple, list[dict]] = {}
    for c in output.cases:
        if c["key"] is not None:
            groups.setdefault((c["family"], c["impl"], c["key"]), []).append(c)
    recorded, incomplete = [], []
    for (family, impl, key), runs in sorted(groups.items()):
        counts = {s: sum(1 for r in runs if r["status"] == s) for s in ("passed", "failed", "skipped")}
        passed = [r for r in runs if r["status"] == "passed"]
        if passed and not counts["failed"]:
            rms = max((e["rms"] for r in passed for e in r["errors"].values()), default=0.0)
            calls = sorted({r["case"].split(": ", 1)[-1] for r in passed})
            cut = f"; {counts['skipped']} more not run (time budget)" if counts["skipped"] else ""
            recorded.append(dict(family=family, impl=impl, case=key, device_kind=device_kind, jax=jax.__version__,
                                 test=f"{SCRIPT}: forward + VJP vs {passed[0]['versus']}, {len(passed)} call(s) "
                                      f"({'; '.join(calls)}), max rms error {rms:.2g}{cut}"))
        else:
            incomplete.append(dict(family=family, impl=impl, case=key, device_kind=device_kind, calls=counts,
                                   why="a call failed" if counts["failed"] else "no call ran (time budget)"))
    output.recorded, output.incomplete = recorded, incomplete
    committed = json.loads(device_results.RESULTS.read_text())
    tested = {(c["family"], c["impl"]) for c in output.cases if c["status"] in ("passed", "failed")}
    kept = [e for e in committed.get("passed", [])
            if not (e.get("device_kind") == device_kind and (e.get("family"), e.get("impl")) in tested)]
    order = ("family", "impl", "device_kind", "case")
    merged = sorted(kept + recorded, key=lambda e: tuple(str(e.get(k)) for k in order))
    doc = {"about": committed.get("about", ""), "passed": merged}
    if smoke:
        doc["smoke"] = ("CPU smoke run: xla stands in for the GPU implementations (device_kind 'cpu'); "
                        "never copy this file into the repository")
    output.results_doc = doc
