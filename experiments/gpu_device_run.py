"""The one prepared GPU device run (docs/gpu_device_run.md): conformance on a real GPU, then the benchmark.

    PYTHONPATH=.:/tmp/site python3 experiments/gpu_device_run.py --out $OUT     # on the lent H100 / H200
    python experiments/gpu_device_run.py --cpu-smoke --out /tmp/smoke          # the whole flow, tiny, on CPU

Everything is discovered from the family registry at run time, so GPU kernels registered later are
picked up with no edit here: a *GPU implementation* is one whose backend names a GPU (``"gpu"``: a
library call such as cuDNN; ``"mosaic_gpu"``: a Pallas kernel) or whose name starts with ``pallas_gpu`` /
``cudnn``.

1. Environment: python, jax (+ plugins), devices and device_kind, torch / triton / fla versions (or
   "absent"), nvidia-smi's clocks, and a bf16 matmul rate measured here (the ceiling for the TF/s).
2. Conformance: for every GPU implementation, a small set of call cases per family (attention: full,
   causal, window; MHA and GQA; bf16 and fp16; head dims 128 and 64; lengths 197 and 333 (not multiples
   of 128) and 1024; cross-attention; packed documents, soft cap, sinks, lse, other masks, fp32, d256),
   forward and VJP (random cotangents) against the family's ``reference`` with ``seqmix.testing``'s
   tolerances. A case the implementation's ``supports()`` refuses is listed as skipped with its reason.
   Calls are grouped by the implementation's ``device_case(call)`` key ("*" without one): a key is
   recorded as passed when a call of it passed on this device and none failed (a failure anywhere in
   the key records nothing; calls the time budget cut are named in the entry). ``device_results.json``
   is the committed ``seqmix/ops/gpu/device_results.json`` with this run's results for this device kind
   merged in (entries of a (family, impl) tested here on this device kind are replaced, so a regression
   removes a pass); ``gpu_conformance.json`` lists every case with its status and errors.
3. Benchmark (interleaved A, B, C, A, B, C ... after compile and warm-up; median of N synchronized
   calls timed by the host clock, the same rule for JAX and PyTorch; useful TF/s from the family
   record's FLOPs, the same count for every implementation of a row):
   * attention ``[2, 8192, 16, 128]`` bf16, causal / full / causal window 4096, forward and forward +
     backward: ``pallas_gpu`` vs ``cudnn`` (jax.nn's cuDNN path) vs ``xla``;
   * ``simple_gla``, ``gla``, ``gated_delta_rule`` ``[4, 8192, 16, 128]`` bf16 forward + backward:
     ``pallas_gpu`` vs ``xla`` vs flash-linear-attention's Triton kernels through PyTorch (``fla``: the
     same arrays handed over by DLPack, in the same ``[B, T, H, D]`` layout, same log-space gates and
     scale); fla is checked against seqmix's reference on a small case after its warm-up (autotuning) at
     the benchmark shape and before its timing (errors in the JSON, ``fla_checks``); then, with the time
     left, ``pallas_gpu@stages=1``: the same kernels without their TMA input ring (``common.VARIANTS``).
   Every row's first output is compared with ``xla``'s (``vs_xla_error``): the same function is timed.
   A spec'd implementation that is not registered gets rows saying "not registered"; GPU implementations
   registered later are added to their family's rows.
4. A hard time budget (``--budget-s``, default 420 s of an 8-minute slot, counted from after the imports;
   conformance 180 s; the attention benchmark leaves 150 s to the recurrent one): phases stop starting
   work that would not fit ("skipped: time budget") and a watchdog writes what exists and exits (code 3)
   if a compile or autotune overruns the budget by ``--grace-s`` (20 s).
5. Files under ``--out`` (default ``$OUT``): ``device_results.json``, ``gpu_conformance.json``,
   ``gpu_bench.json``, ``gpu_bench.md`` (the tables), rewritten after every step.

``--cpu-smoke`` runs the same flow at tiny shapes on CPU: ``xla`` stands in for the GPU implementations
in the conformance (recorded with device_kind "cpu" in a file marked ``"smoke"``: never copy it into
the repository) and the GPU implementations and fla are skipped with their reasons.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent  # the run's modules, one job each: experiments/gpu_device/
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# JAX and PyTorch share the GPU in one process: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--cpu-smoke" in sys.argv:  # run as a script: no accelerator probing (libtpu's host discovery) on CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from gpu_device.bench import run_attention_bench, run_recurrent_bench  # noqa: E402
from gpu_device.budget import Budget, Output, log  # noqa: E402
from gpu_device.common import ATTENTION_SPEC, RECURRENT_SPEC, _short  # noqa: E402
from gpu_device.conformance import run_conformance  # noqa: E402
from gpu_device.env import environment  # noqa: E402
from gpu_device.report import markdown  # noqa: E402
from gpu_device.watchdog import start_watchdog  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder (default $OUT, else ./out)")
    p.add_argument("--cpu-smoke", action="store_true", help="the whole flow at tiny shapes on CPU (xla only)")
    p.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default 420; smoke 240)")
    p.add_argument("--grace-s", type=float, default=20.0, help="watchdog: exit this long after the budget")
    p.add_argument("--no-watchdog", action="store_true",
                   help="no hard exit at the budget's end (for in-process callers such as the tests)")
    p.add_argument("--conformance-budget-s", type=float, default=180.0)
    p.add_argument("--recurrent-reserve-s", type=float, default=150.0,
                   help="the attention benchmark starts no group that would eat into this")
    p.add_argument("--min-group-s", type=float, default=None, help="skip a benchmark group with less left")
    p.add_argument("--fla-min-s", type=float, default=None, help="start fla's (autotuning) warm-up only with this left")
    p.add_argument("--reps", type=int, default=None, help="timed calls per implementation (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compile (default 2; smoke 1)")
    p.add_argument("--cap-s", type=float, default=3.0, help="stop timing an implementation after this many seconds")
    p.add_argument("--recurrent-modes", nargs="+", default=list(RECURRENT_SPEC["modes"]), choices=["fwd", "fwd+bwd"])
    p.add_argument("--families", nargs="+", default=None, help="only these families (default: all)")
    p.add_argument("--masks", nargs="+", default=list(ATTENTION_SPEC["masks"]), choices=list(ATTENTION_SPEC["masks"]),
                   help="attention benchmark masks (default: all three)")
    p.add_argument("--only", nargs="+", choices=["conformance", "attention", "recurrent"],
                   default=["conformance", "attention", "recurrent"])
    opts = p.parse_args(argv)
    smoke = opts.cpu_smoke
    defaults = dict(budget_s=(240.0, 420.0), min_group_s=(0.0, 20.0), fla_min_s=(0.0, 45.0), reps=(2, 20),
                    warmup=(1, 2))
    for name, (small, full) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, small if smoke else full)
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    budget = Budget(opts.budget_s)
    output = Output(Path(opts.out), opts.cpu_smoke)
    if not opts.cpu_smoke and jax.default_backend() != "gpu":
        print(f"no GPU here (jax backend {jax.default_backend()!r}): run with --cpu-smoke, or on the device "
              f"machine (docs/gpu_device_run.md)", file=sys.stderr)
        return 2
    watchdog = None if opts.no_watchdog else start_watchdog(output, budget, opts.grace_s)
    try:
        output.env = environment(opts.cpu_smoke)
        output.env.update(budget_s=opts.budget_s, argv=sys.argv[1:] if argv is None else list(argv))
        log(budget, "environment:\n" + json.dumps(output.env, indent=2, default=str))
        output.write()
        if "conformance" in opts.only:
            run_conformance(output, budget, time.monotonic() + opts.conformance_budget_s, opts.cpu_smoke,
                            opts.families)
            log(budget, f"conformance done: recorded {len(output.recorded)} case key(s), "
                        f"{len(output.incomplete)} not recorded")
        if "attention" in opts.only:
            reserve = opts.recurrent_reserve_s if "recurrent" in opts.only and not opts.cpu_smoke else 0.0
            log(budget, "attention benchmark")
            run_attention_bench(output, budget, budget.end - reserve, opts)
        if "recurrent" in opts.only:
            log(budget, "recurrent benchmark")
            run_recurrent_bench(output, budget, budget.end, opts)
        output.finished = True
        output.write()
    except BaseException as err:  # what exists is written, with the error, before it propagates
        output.write(note=f"aborted after {budget.elapsed():.0f} s: {_short(err, 2000)}")
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    print(markdown(output))
    for c in output.cases:
        if c["status"] == "failed":
            print(f"FAILED {c['family']}/{c['impl']} {c['case']}: {c.get('error', '')[:300]}")
    print(f"wrote {', '.join(sorted(p.name for p in output.out.glob('*') if p.suffix in ('.json', '.md')))} "
          f"to {output.out} in {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
