"""The benchmark: each group's candidates compiled, warmed up and timed interleaved; attention and recurrent."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp

from bench import loss_and_grads  # experiments/bench.py: the fwd+bwd every benchmark here times
from seqmix import ops
from seqmix.ops import _registry
from seqmix.ops import masks as M

from .budget import Budget, Output, log
from .cases import _mask, _normal
from .common import (ATTENTION_SPEC, RECURRENT_SPEC, SMOKE_ATTENTION_SHAPE, SMOKE_RECURRENT_SHAPE, VARIANTS, _short,
                     gpu_impls, run_problem)
from .fla import fla_candidate, fla_check
from .runner import Runner, errors_vs


@contextlib.contextmanager
def gpu_tiles(**change):
    """The recurrent Mosaic GPU kernels' H100 tiles with ``change`` applied (``GLATiles`` fields) while the
    block runs: what a :data:`VARIANTS` candidate is traced and compiled under."""
    from pallas_kernels.gpu import gated_linear as gl

    saved = gl.H100_TILES
    gl.H100_TILES = dataclasses.replace(saved, **change)
    try:
        yield
    finally:
        gl.H100_TILES = saved


def jax_candidate(fam, impl_name, args, kwargs, mode, smoke):
    """(runner factory, describe) for a registry implementation or a :data:`VARIANTS` candidate, or a status
    string."""
    if impl_name in VARIANTS:
        base, change = VARIANTS[impl_name]
        with gpu_tiles(**change):
            got = jax_candidate(fam, base, args, kwargs, mode, smoke)
        if isinstance(got, str):
            return got
        make, describe = got

        def make_variant():
            with gpu_tiles(**change):
                return make()

        return make_variant, describe
    if impl_name not in fam.implementations:
        return "not registered"
    impl = fam.implementations[impl_name]
    try:
        call = fam.prepare(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        return f"failed: {_short(err)}"
    reason = run_problem(impl, call, smoke)
    if reason:
        return f"skipped: {reason}"
    n = len(args)

    def forward(*a):
        return fam.op(*a, **kwargs, impl=impl_name)

    fn = forward if mode == "fwd" else loss_and_grads(forward, n)  # fla's rows run the forward too

    def make():
        compiled = jax.jit(fn).lower(*args).compile()
        return Runner(lambda: jax.block_until_ready(compiled(*args)))

    return make, (impl.describe(call) if impl.describe else None)


def bench_group(output: Output, budget: Budget, deadline: float, *, family: str, shape, dtype, mask: str, mode: str,
                args, kwargs, flops: float, candidates: list[str], reps: int, warmup: int, cap_s: float,
                min_group_s: float, fla_min_s: float, smoke: bool,
                after_warmup: Callable[[dict], None] | None = None) -> None:
    """One row per candidate: compile and warm every runnable candidate, then interleave the timed calls."""
    fam = ops.get_family(family)
    base = dict(family=family, shape=list(shape), dtype=jnp.dtype(dtype).name, mask=mask, mode=mode,
                useful_flops=flops)
    rows = {c: dict(base, impl=c) for c in candidates}
    if budget.left(deadline) < min_group_s:
        for c in candidates:
            rows[c]["status"] = "skipped: time budget"
        output.rows += rows.values()
        output.write()
        log(budget, f"  {family} {mask} {mode}: skipped (time budget)")
        return
    runners, firsts = {}, {}
    for c in candidates:
        got = (fla_candidate(family, args, kwargs, mode) if c == "fla"
               else jax_candidate(fam, c, args, kwargs, mode, smoke))
        if isinstance(got, str):
            rows[c]["status"] = got
            continue
        make, describe = got
        if describe:
            rows[c]["describe"] = describe
        need = fla_min_s if c == "fla" or c in VARIANTS else 0.0  # optional rows start only with room left
        if budget.left(deadline) <= need:
            rows[c]["status"] = "skipped: time budget"
            continue
        t0 = time.monotonic()
        try:
            runner = make()
            out = runner.run()
            for _ in range(warmup - 1):
                runner.run()
            rows[c]["compile_and_warmup_s"] = round(time.monotonic() - t0, 2)
            runners[c], firsts[c] = runner, out
        except Exception as err:  # noqa: BLE001
            rows[c]["status"] = f"failed: {_short(err)}"
            traceback.print_exc()
    if after_warmup is not None:
        after_warmup(rows)
    times = {c: [] for c in runners}
    spent = {c: 0.0 for c in runners}
    for _ in range(reps):
        active = [c for c in runners if len(times[c]) < 3 or spent[c] < cap_s]
        if not active or (min(len(times[c]) for c in runners) >= 3 and budget.left(deadline) <= 0):
            break
        for c in active:  # interleaved: A, B, C, A, B, C, ...
            try:
                dt = runners[c].timed()
            except Exception as err:  # noqa: BLE001
                rows[c]["status"] = f"failed: {_short(err)}"
                runners.pop(c)
                continue
            times[c].append(dt)
            spent[c] += dt
    ref = firsts.get("xla")
    for c, ts in times.items():
        if not ts or rows[c].get("status"):
            continue
        med = statistics.median(ts)
        rows[c].update(status="ok", ms=med * 1e3, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3, reps=len(ts),
                       tflops=flops / med / 1e12)
        if ref is not None and c != "xla":
            try:
                rows[c]["vs_xla_error"] = errors_vs(firsts[c], ref)
            except Exception as err:  # noqa: BLE001
                rows[c]["vs_xla_error"] = _short(err)
    xla_ms = rows.get("xla", {}).get("ms")
    for c in candidates:
        if xla_ms and rows[c].get("ms"):
            rows[c]["speedup_vs_xla"] = xla_ms / rows[c]["ms"]
        rows[c].setdefault("status", "failed: no timing")
    firsts.clear()
    output.rows += rows.values()
    output.write()
    for c in candidates:
        row = rows[c]
        timing = f"{row['ms']:9.3f} ms {row['tflops']:7.3g} TF/s" if row.get("ms") else " " * 26
        log(budget, f"  {family:16s} {mask:12s} {mode:8s} {c:19s} {timing}  {row['status'][:160]}")


def _candidates(fam_name: str, spec_impls, external=(), variants=()) -> list[str]:
    fam = ops.get_family(fam_name)
    extra = [n for n in gpu_impls(fam) if n not in spec_impls]  # kernels registered after this script
    return list(spec_impls) + extra + list(external) + list(variants)


def run_attention_bench(output: Output, budget: Budget, deadline: float, opts) -> None:
    spec = ATTENTION_SPEC
    if opts.families and "attention" not in opts.families:
        return
    shape = SMOKE_ATTENTION_SHAPE if opts.cpu_smoke else spec["shape"]
    b, t, h, d = shape
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(11), 3)
    q, k, v = (_normal(x, shape, spec["dtype"]) for x in (kq, kk, kv))
    for mask_name in opts.masks:
        if mask_name.startswith("window:"):  # the smoke run scales the window with T
            w = int(mask_name[7:]) * t // spec["shape"][1]
            mask = M.LocalWindow(w)
        else:
            mask = _mask(mask_name, t)
        flops_fwd = _registry.useful_flops("attention", q, k, v, mask=mask)
        for mode in spec["modes"]:
            flops = _registry.with_backward(flops_fwd) if mode == "fwd+bwd" else flops_fwd
            bench_group(output, budget, deadline, family="attention", shape=shape, dtype=spec["dtype"], mask=mask_name,
                        mode=mode, args=(q, k, v), kwargs=dict(mask=mask), flops=flops,
                        candidates=_candidates("attention", spec["impls"]), reps=opts.reps, warmup=opts.warmup,
                        cap_s=opts.cap_s, min_group_s=opts.min_group_s, fla_min_s=opts.fla_min_s,
                        smoke=opts.cpu_smoke)


def run_recurrent_bench(output: Output, budget: Budget, deadline: float, opts) -> None:
    spec = RECURRENT_SPEC
    shape = SMOKE_RECURRENT_SHAPE if opts.cpu_smoke else spec["shape"]
    b, t, h, d = shape
    for family in spec["families"]:
        if opts.families and family not in opts.families:
            continue
        if family not in ops.FAMILIES:
            output.rows.append(dict(family=family, impl="*", status="not registered (family)"))
            continue
        fam = ops.get_family(family)
        checked = []

        def check(rows, family=family, checked=checked):
            """fla's numerics, once per family: after its warm-up (autotuning) at this shape, before timing."""
            if checked or "fla" not in rows:
                return
            checked.append(True)
            status = rows["fla"].get("status", "")
            if status:  # fla did not warm up: nothing to check
                output.fla_checks[family] = dict(status=status)
            elif budget.left(deadline) > opts.min_group_s:
                fla_check(output, budget, family, h, d)
                rows["fla"]["numerics_check"] = output.fla_checks[family]["status"][:300]
            else:
                output.fla_checks[family] = dict(status="skipped: time budget")
            output.write()

        inputs = fam.make_inputs(fam, jax.random.PRNGKey(12), batch=b, seq=t, heads=h, dk=d, dv=d, dtype=spec["dtype"],
                                 initial_state=False)
        args, kwargs = tuple(inputs.args), dict(inputs.arrays, **inputs.options)
        flops_fwd = _registry.useful_flops(family, *args, **kwargs)
        for mode in opts.recurrent_modes:
            flops = _registry.with_backward(flops_fwd) if mode == "fwd+bwd" else flops_fwd
            bench_group(output, budget, deadline, family=family, shape=shape, dtype=spec["dtype"], mask="causal",
                        mode=mode, args=args, kwargs=kwargs, flops=flops,
                        candidates=_candidates(family, spec["impls"], spec["external"], spec["variants"]),
                        reps=opts.reps,
                        warmup=opts.warmup, cap_s=opts.cap_s, min_group_s=opts.min_group_s, fla_min_s=opts.fla_min_s,
                        smoke=opts.cpu_smoke, after_warmup=check)
        if family not in output.fla_checks and "fla" in spec["external"]:
            output.fla_checks[family] = dict(status="skipped: time budget")
