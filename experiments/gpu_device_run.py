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
     the benchmark shape and before its timing (errors in the JSON, ``fla_checks``).
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
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# JAX and PyTorch share the GPU in one process: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--cpu-smoke" in sys.argv:  # run as a script: no accelerator probing (libtpu's host discovery) on CPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import _target  # noqa: E402
from seqmix import ops, testing  # noqa: E402
from seqmix.ops import _registry  # noqa: E402
from seqmix.ops import masks as M  # noqa: E402
from seqmix.ops.gpu import device_results  # noqa: E402

SCRIPT = "experiments/gpu_device_run.py"
BF16, FP16, FP32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
GPU_PREFIXES = ("pallas_gpu", "cudnn")

# The benchmark the issue asks for; implementations named here get rows even when not registered.
ATTENTION_SPEC = dict(family="attention", shape=(2, 8192, 16, 128), dtype=BF16,
                      masks=("causal", "full", "window:4096"), modes=("fwd", "fwd+bwd"),
                      impls=("pallas_gpu", "cudnn", "xla"))
RECURRENT_SPEC = dict(families=("simple_gla", "gla", "gated_delta_rule"), shape=(4, 8192, 16, 128), dtype=BF16,
                      modes=("fwd+bwd",), impls=("pallas_gpu", "xla"), external=("fla",))
SMOKE_ATTENTION_SHAPE = (1, 64, 2, 16)
SMOKE_RECURRENT_SHAPE = (1, 80, 2, 16)

# flash-linear-attention's chunk kernels: same [B, T, H, D] layout, log-space gates, scale defaulting to
# Dk^-0.5, positional (q, k, v, g[, beta]) like seqmix's ops.
FLA_OPS = {"simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
           "gla": ("fla.ops.gla", "chunk_gla"),
           "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}


def is_gpu_impl(impl: _registry.Implementation) -> bool:
    """A GPU library call (backend ``"gpu"``), a GPU kernel (``"mosaic_gpu"``, any backend naming a GPU) or
    an implementation named like one."""
    return "gpu" in (impl.backend or "") or impl.name.startswith(GPU_PREFIXES)


def run_problem(impl: _registry.Implementation, call, smoke: bool) -> str | None:
    """Why ``impl`` is not run for ``call`` here (None: it runs): its backend cannot run for this target,
    the smoke run would only interpret it, or its ``supports()`` refuses the call."""
    if impl.backend:
        problem = _target.backend_problem(impl.backend)
        if problem:
            return problem
        if smoke and _target.platform() != "gpu":
            return (f"--cpu-smoke runs only what runs natively on CPU; backend {impl.backend!r} would run in an "
                    f"interpreter here (the device run compiles it)")
    try:
        return impl.supports(call)
    except Exception as err:  # noqa: BLE001 - never a pass
        return f"supports() raised {_short(err)}"


def gpu_impls(fam: _registry.Family) -> list[str]:
    return [i.name for i in fam.implementations.values() if is_gpu_impl(i)]


def _short(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- budget, output, progress


class Budget:
    """Wall-clock budget from the script's start: ``left()`` to the end or to a phase deadline."""

    def __init__(self, total_s: float):
        self.t0 = time.monotonic()
        self.end = self.t0 + total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, deadline: float | None = None) -> float:
        return min(self.end, deadline if deadline is not None else self.end) - time.monotonic()


class Output:
    """What the run writes under ``--out``, rewritten after every step (a watchdog can flush it too)."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.lock = threading.Lock()
        self.env: dict = {}
        self.cases: list[dict] = []
        self.recorded: list[dict] = []
        self.incomplete: list[dict] = []
        self.rows: list[dict] = []
        self.fla_checks: dict = {}
        self.notes: list[str] = []
        self.results_doc: dict | None = None
        self.finished = False

    def _dump(self, name: str, data) -> None:
        path = self.out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)

    def write(self, note: str | None = None) -> None:
        with self.lock:
            if note:
                self.notes.append(note)
            self.out.mkdir(parents=True, exist_ok=True)
            meta = dict(script=SCRIPT, smoke=self.smoke, finished=self.finished, notes=self.notes, env=self.env)
            summary = {s: sum(1 for c in self.cases if c["status"] == s) for s in ("passed", "failed", "skipped")}
            self._dump("gpu_conformance.json", dict(meta, summary=summary, recorded=self.recorded,
                                                    incomplete=self.incomplete, cases=self.cases))
            if self.results_doc is not None:
                self._dump("device_results.json", self.results_doc)
            self._dump("gpu_bench.json", dict(meta, fla_checks=self.fla_checks, rows=self.rows))
            self._dump("gpu_bench.md", markdown(self))


def log(budget: Budget, msg: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {msg}", flush=True)


def start_watchdog(output: Output, budget: Budget, grace_s: float) -> threading.Timer:
    """After the budget plus ``grace_s``, flush what exists and exit with code 3 (a hung compile or
    autotune must not cost the rest of the slot, nor the files)."""

    def fire():
        try:
            note = (f"watchdog: the time budget ran out (+{grace_s:.0f} s grace) during a step; this output "
                    "is partial")
            try:
                if output.results_doc is None and output.cases:  # the passes so far still count
                    record_results(output, jax.devices()[0].device_kind, output.smoke)
                output.write(note=note)
            except Exception:  # noqa: BLE001 - a list changed under json.dumps: once more
                output.write()
            print(f"watchdog: time budget exhausted after {budget.elapsed():.0f} s; partial results written "
                  f"to {output.out}", flush=True)
        finally:
            os._exit(3)

    timer = threading.Timer(max(1.0, budget.left() + grace_s), fire)
    timer.daemon = True
    timer.start()
    return timer


# ----------------------------------------------------------------------------- environment


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def _timed_median(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(smoke: bool) -> dict:
    dev = jax.devices()[0]
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), machine=platform.machine(), jax=jax.__version__,
               jaxlib=_dist_version("jaxlib"),
               jax_plugins={n: v for n in ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                                           "jax-cuda12-pjrt") if (v := _dist_version(n)) != "absent"},
               backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
               device_kind=dev.device_kind, compute_capability=getattr(dev, "compute_capability", None),
               torch=_dist_version("torch"), triton=_dist_version("triton"),
               fla=_dist_version("fla-core", "flash-linear-attention"),
               xla_python_client_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
               gpu_implementations={n: gpu_impls(f) for n, f in sorted(ops.FAMILIES.items()) if gpu_impls(f)})
    if shutil.which("nvidia-smi"):
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                 "temperature.gpu,power.draw", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as err:  # noqa: BLE001 - informational only
            env["nvidia_smi"] = _short(err)
    n = 256 if smoke else 8192
    try:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(BF16)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(BF16)
        f = jax.jit(jnp.dot).lower(a, b).compile()
        env["matmul_bf16_tflops"] = 2.0 * n ** 3 / _timed_median(lambda: f(a, b), 3 if smoke else 10) / 1e12
        env["matmul_size"] = n
    except Exception as err:  # noqa: BLE001
        env["matmul_bf16_tflops"] = None
        env["matmul_error"] = _short(err)
    return env


# ----------------------------------------------------------------------------- conformance cases


@dataclasses.dataclass
class Case:
    """One call of a family's op: ``build(key) -> (args, kwargs)``, compared with ``ref``."""

    family: str
    desc: str
    tier: int
    build: Callable[[Any], tuple[tuple, dict]]
    ref: str = "reference"


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _segments(b: int, t: int, lengths) -> jax.Array:
    ids = np.zeros((b, t), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        ids[:, start:start + n] = i
        start += n
    ids[:, start:] = len(lengths)
    return jnp.asarray(ids)


def _mask(name: str, t: int):
    if name == "causal":
        return M.Causal()
    if name == "full":
        return None
    if name == "window":
        return M.LocalWindow(max(8, t // 3))
    if name.startswith("window:"):
        return M.LocalWindow(int(name[7:]))
    raise ValueError(name)


def attention_case(tier: int, desc: str, *, b=2, tq=197, s=None, hq=8, hkv=8, d=128, dtype=BF16, mask="causal",
                   **extra) -> Case:
    s = tq if s is None else s

    def build(key):
        kq, kk, kv, ks = jax.random.split(key, 4)
        q = _normal(kq, (b, tq, hq, d), dtype)
        k, v = _normal(kk, (b, s, hkv, d), dtype), _normal(kv, (b, s, hkv, d), dtype)
        kwargs = dict(mask=_mask(mask, tq) if isinstance(mask, str) else mask)
        for name, value in extra.items():
            kwargs[name] = value(ks) if callable(value) else value
        return (q, k, v), kwargs

    heads = "mha" if hq == hkv else f"gqa {hq}:{hkv}"
    return Case("attention", f"{desc}: B={b} Tq={tq} S={s} {heads} d{d} {dtype.name}", tier, build)


def attention_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [attention_case(1, "causal", b=1, tq=37, hq=2, hkv=2, d=16),
                attention_case(2, "window, packed documents", b=1, tq=37, hq=4, hkv=2, d=16, dtype=FP16,
                               mask="window", segment_ids=_segments(1, 37, [1, 15, 16]))]
    cases = []
    # (tier, dtype, head_dim, lengths): the benchmark's dtype and head_dim first, with a ragged length (197:
    # two blocks of 128, the second partial) and a longer one; then one ragged length (333) for the rest.
    plan = [(1, BF16, 128, (197, 1024)), (2, FP16, 128, (333,)), (3, BF16, 64, (333,)), (3, FP16, 64, (333,))]
    for tier, dtype, d, lengths in plan:
        for mask in ("causal", "full", "window"):
            for hq, hkv in ((8, 8), (8, 2)):
                for t in lengths:
                    cases.append(attention_case(tier, mask, tq=t, hq=hq, hkv=hkv, d=d, dtype=dtype, mask=mask))
        cases.append(attention_case(tier, "full, cross-attention", tq=128, s=300, d=d, dtype=dtype, mask="full"))
    feature = dict(tq=300, hq=8, hkv=2)
    cases += [
        attention_case(4, "packed documents, causal", segment_ids=_segments(2, 300, [1, 127, 128, 17]), **feature),
        attention_case(4, "soft cap 30, causal", soft_cap=30.0, **feature),
        attention_case(4, "sink logits, causal", sink_logits=lambda key: jax.random.normal(key, (8,), jnp.float32),
                       **feature),
        attention_case(4, "return_lse, causal", return_lse=True, **feature),
        attention_case(4, "chunked causal 64", mask=M.ChunkedCausal(64), **feature),
        attention_case(4, "streaming window 64 + 4 sinks", mask=M.streaming(64, 4), **feature),
        attention_case(4, "causal fp32", dtype=FP32, **feature),
        attention_case(4, "causal, head_dim 256", tq=300, hq=4, hkv=4, d=256),
    ]
    return cases


def recurrent_case(fam: _registry.Family, tier: int, desc: str, *, b=2, t=300, h=4, d=128, dtype=BF16,
                   regime="typical", initial_state=True, segments=None, chunk_size=None) -> Case:
    def build(key):
        inputs = fam.make_inputs(fam, key, batch=b, seq=t, heads=h, dk=d, dv=d, dtype=dtype, regime=regime,
                                 initial_state=initial_state)
        kwargs = dict(inputs.arrays, **inputs.options, return_state=True)
        if segments:
            kwargs["segment_ids"] = _segments(b, t, segments)
        if chunk_size:
            kwargs["chunk_size"] = chunk_size
        return tuple(inputs.args), kwargs

    extra = (", initial state" if initial_state else "") + (", packed documents" if segments else "")
    return Case(fam.name, f"{desc}{extra}: B={b} T={t} H={h} D={d} {jnp.dtype(dtype).name} ({regime} gates)",
                tier, build)


def recurrent_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    if smoke:
        return [recurrent_case(fam, 1, "chunked", b=1, t=37, h=2, d=16, chunk_size=16)]
    return [recurrent_case(fam, 1, "chunked", t=300),
            recurrent_case(fam, 1, "long", t=2048, initial_state=False),
            recurrent_case(fam, 2, "stress gates", t=197, d=64, regime="stress", segments=[1, 63, 64, 20]),
            recurrent_case(fam, 2, "chunked", t=300, dtype=FP16),
            recurrent_case(fam, 3, "chunked", t=130, d=64, dtype=FP32)]


def generic_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    """Families without cases of their own: the record's input factory at two lengths."""

    def case(t, dtype):
        def build(key):
            inputs = fam.make_inputs(fam, key, batch=1 if smoke else 2, seq=t, heads=4, dk=16 if smoke else 64,
                                     dv=16 if smoke else 64, dtype=dtype)
            return tuple(inputs.args), dict(inputs.arrays, **inputs.options)
        return Case(fam.name, f"record inputs: T={t} {dtype.name}", 1, build)

    return [case(37, BF16)] if smoke else [case(197, BF16), case(1024, BF16), case(197, FP16)]


def family_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    if fam.name == "attention":
        return attention_cases(smoke)
    if fam.kind == "recurrent":
        return recurrent_cases(fam, smoke)
    return generic_cases(fam, smoke)


# ----------------------------------------------------------------------------- conformance runner


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


# ----------------------------------------------------------------------------- benchmark


class Runner:
    """One synchronized call: ``sync(); t0; call(); sync(); t1`` (JAX: ``call`` blocks until ready)."""

    def __init__(self, call: Callable[[], Any], sync: Callable[[], None] | None = None):
        self.call, self.sync = call, sync or (lambda: None)

    def run(self):
        out = self.call()
        self.sync()
        return out

    def timed(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.call()
        self.sync()
        return time.perf_counter() - t0


@jax.jit
def _err(x, r):
    x, r = x.astype(jnp.float32), r.astype(jnp.float32)
    d = x - r
    return (jnp.sqrt(jnp.sum(d * d)) / (jnp.sqrt(jnp.sum(r * r)) + 1e-8), jnp.max(jnp.abs(d)))


def _to_jax(x):
    if isinstance(x, jax.Array):
        return x
    try:  # a torch tensor
        return jax.dlpack.from_dlpack(x.detach().contiguous())
    except Exception:  # noqa: BLE001 - through the host
        return jnp.asarray(x.detach().float().cpu().numpy())


def _to_torch(x):
    import torch

    jax.block_until_ready(x)
    try:
        t = torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - through the host (bf16 goes via fp32: exact)
        dtype = {BF16: torch.bfloat16, FP16: torch.float16, FP32: torch.float32}[jnp.dtype(x.dtype)]
        t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device="cuda", dtype=dtype)
    return t.clone()  # its own memory


def errors_vs(out, ref) -> dict | None:
    """Max relative rms and max abs error over the leaves of ``out`` against ``ref`` (same structure)."""
    xs, rs = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)
    if len(xs) != len(rs):
        return None
    errs = []
    for x, r in zip(xs, rs):
        x = _to_jax(x)
        if x.shape != r.shape:
            return None
        errs.append(tuple(float(v) for v in _err(x, r)))
    return dict(rms=float(np.max([e[0] for e in errs])), max_abs=float(np.max([e[1] for e in errs])))  # NaN stays


def jax_candidate(fam, impl_name, args, kwargs, mode, smoke):
    """(runner factory, describe) for a registry implementation, or a status string."""
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

    fn = forward if mode == "fwd" else jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(),
                                                argnums=tuple(range(n)))

    def make():
        compiled = jax.jit(fn).lower(*args).compile()
        return Runner(lambda: jax.block_until_ready(compiled(*args)))

    return make, (impl.describe(call) if impl.describe else None)


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
        need = fla_min_s if c == "fla" else 0.0
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
        log(budget, f"  {family:16s} {mask:12s} {mode:8s} {c:12s} {timing}  {row['status'][:160]}")


def _candidates(fam_name: str, spec_impls, external=()) -> list[str]:
    fam = ops.get_family(fam_name)
    extra = [n for n in gpu_impls(fam) if n not in spec_impls]  # kernels registered after this script
    return list(spec_impls) + extra + list(external)


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
                        candidates=_candidates(family, spec["impls"], spec["external"]), reps=opts.reps,
                        warmup=opts.warmup, cap_s=opts.cap_s, min_group_s=opts.min_group_s, fla_min_s=opts.fla_min_s,
                        smoke=opts.cpu_smoke, after_warmup=check)
        if family not in output.fla_checks and "fla" in spec["external"]:
            output.fla_checks[family] = dict(status="skipped: time budget")


# ----------------------------------------------------------------------------- report


def markdown(output: Output) -> str:
    env = output.env
    lines = [f"GPU device run ({SCRIPT}{', CPU smoke' if output.smoke else ''}): {env.get('device_kind')}, "
             f"jax {env.get('jax')}, torch {env.get('torch')}, triton {env.get('triton')}, fla {env.get('fla')}, "
             f"{env.get('date')}; measured bf16 matmul "
             + (f"{env['matmul_bf16_tflops']:.0f} TF/s" if env.get("matmul_bf16_tflops") else "n/a") + ".", "",
             "Median of N synchronized calls (host clock) after compile and warm-up, implementations interleaved; "
             "TF/s = the family record's useful FLOPs (the same for every row of a group) / median time.", "",
             "| family | impl | shape | dtype | mask | mode | ms | TF/s | × xla | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in output.rows:
        shape = "×".join(str(x) for x in r.get("shape", [])) or "-"
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        tf = (f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.2g}") if r.get("tflops") else "-"
        sp = f"{r['speedup_vs_xla']:.2f}" if r.get("speedup_vs_xla") else "-"
        status = str(r.get("status", "")).replace("|", "/")
        lines.append(f"| {r['family']} | {r['impl']} | {shape} | {r.get('dtype', '-')} | {r.get('mask', '-')} | "
                     f"{r.get('mode', '-')} | {ms} | {tf} | {sp} | {status[:200]} |")
    if output.fla_checks:
        lines += ["", "fla numerics check against seqmix's reference (before timing):", "",
                  "| family | status | max abs error |", "|---|---|---|"]
        for fam, c in output.fla_checks.items():
            err = f"{c['max_abs_error']:.3g}" if c.get("max_abs_error") is not None else "-"
            lines.append(f"| {fam} | {str(c['status'])[:200].replace('|', '/')} | {err} |")
    summary = {s: sum(1 for c in output.cases if c["status"] == s) for s in ("passed", "failed", "skipped")}
    lines += ["", f"Conformance: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
                  f"calls; recorded cases: " + (", ".join(f"{e['family']}/{e['impl']} {e['case']}"
                                                         for e in output.recorded) or "none")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


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
