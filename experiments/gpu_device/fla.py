"""flash-linear-attention through PyTorch: whether it runs here, its benchmark candidate, its numerics check."""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqmix import ops, testing

from .budget import Budget, Output, log
from .common import BF16, FLA_OPS, _short
from .conformance import vjp_run
from .env import _dist_version
from .runner import Runner, _to_jax, _to_torch


_FLA_PROBLEM: list = []


def fla_problem() -> str | None:
    """None if torch sees a GPU and fla's chunk kernels import, else why not (asked once)."""
    if _FLA_PROBLEM:
        return _FLA_PROBLEM[0]
    problem = None
    try:
        import torch

        if not torch.cuda.is_available():
            problem = "torch sees no CUDA device"
        else:
            import triton  # noqa: F401

            for module, name in FLA_OPS.values():
                getattr(importlib.import_module(module), name)
    except Exception as err:  # noqa: BLE001 - absent, or broken
        problem = f"flash-linear-attention unavailable ({_short(err, 200)})"
    _FLA_PROBLEM.append(problem)
    return problem


def _fla_fn(family):
    module, name = FLA_OPS[family]
    return getattr(importlib.import_module(module), name)


def fla_candidate(family, args, kwargs, mode):
    if family not in FLA_OPS:
        return "skipped: no flash-linear-attention counterpart"
    problem = fla_problem()
    if problem:
        return f"skipped: {problem}"
    import torch

    fn = _fla_fn(family)
    scale = kwargs.get("scale") or args[0].shape[-1] ** -0.5

    def make():
        leaves = [_to_torch(a) for a in args]
        if mode == "fwd":
            def call():
                with torch.inference_mode():
                    return fn(*leaves, scale=scale)[0]
        else:
            leaves = [t.requires_grad_(True) for t in leaves]

            def call():
                o = fn(*leaves, scale=scale)[0]
                return torch.autograd.grad(o.float().sum(), leaves)
        return Runner(call, torch.cuda.synchronize)

    module, name = FLA_OPS[family]
    return make, f"{module}.{name} (fla {_dist_version('fla-core', 'flash-linear-attention')})"


def fla_check(output: Output, budget: Budget, family: str, heads: int, dim: int) -> None:
    """fla against seqmix's reference on a small case (initial and final state, random cotangents), run
    after fla's warm-up at the benchmark shape and before its timing; the errors go to the JSON.

    ``heads`` and ``dim`` are the benchmark's: fla's autotuning keys on them (not on B or T), so this
    call reuses the configurations tuned at the benchmark shape instead of tuning for a small one."""
    if family not in FLA_OPS or fla_problem():
        output.fla_checks[family] = dict(status=f"skipped: {fla_problem() or 'no counterpart'}")
        return
    import torch

    fam = ops.get_family(family)
    t0 = time.monotonic()
    try:
        inputs = fam.make_inputs(fam, jax.random.PRNGKey(7), batch=1, seq=300, heads=heads, dk=dim, dv=dim,
                                 dtype=BF16, initial_state=True)
        args, h0 = tuple(inputs.args), inputs.arrays["initial_state"]
        scale = args[0].shape[-1] ** -0.5
        with jax.default_matmul_precision("highest"):
            (o_r, s_r), grads_r, (do, ds) = vjp_run(fam, "reference", args, dict(initial_state=h0, return_state=True),
                                                    jax.random.PRNGKey(8))
        leaves = [_to_torch(a).requires_grad_(True) for a in args]
        h0_t = _to_torch(h0).requires_grad_(True)
        o, s = _fla_fn(family)(*leaves, scale=scale, initial_state=h0_t, output_final_state=True)
        g = torch.autograd.grad((o, s), leaves + [h0_t],
                                grad_outputs=(_to_torch(do).to(o.dtype), _to_torch(ds).to(s.dtype)))
        torch.cuda.synchronize()
        names = ("q", "k", "v") + fam.positional
        got = {"o": o, "final_state": s, **{f"d{n}": x for n, x in zip(names, g)}, "dinitial_state": g[-1]}
        want = {"o": o_r, "final_state": s_r, **{f"d{n}": grads_r[n] for n in names}, "dinitial_state":
                grads_r["initial_state"]}
        kind = testing.tolerance_kind(BF16, "recurrent")
        errs, problems = {}, []
        for n in want:
            x = np.asarray(_to_jax(got[n]).astype(jnp.float32))
            role = "out" if n in ("o", "final_state") else ("grad" if n in ("dq", "dk", "dv", "dinitial_state")
                                                             else "gate")
            rms, rmax, max_abs = testing.errors(x, want[n])
            errs[n] = dict(rms=rms, rmax=rmax, max_abs=max_abs)
            msg = testing.check_close(x, want[n], kind=kind, role=role, name=n)
            if msg:
                problems.append(msg)
        output.fla_checks[family] = dict(
            status="failed: " + "; ".join(problems) if problems else "passed",
            case=f"B=1 T=300 H={heads} D={dim} bf16, fp32 gates (typical), initial state, random cotangents on o "
                 "and the final state; fla vs seqmix reference", tolerance=kind, errors=errs,
            max_abs_error=max(e["max_abs"] for e in errs.values()), seconds=round(time.monotonic() - t0, 1))
    except Exception as err:  # noqa: BLE001
        output.fla_checks[family] = dict(status=f"failed: {_short(err, 1500)}", seconds=round(time.monotonic() - t0, 1))
    log(budget, f"  fla check {family}: {output.fla_checks[family]['status'][:300]}")
