"""Compile report for an H100 (ahead of time, on this CPU host): the table of ``docs/gpu_compile_report.md``.

For every ``gpu:aot`` implementation in the registry and every production config of
``tests/conformance/test_gpu_compile.py`` (``[2, 8192, H, 128]`` bf16: causal, GQA 32:8, window 4096),
forward and forward + backward: compiled or not (with the error), compile seconds, the compiled
program's custom calls, XLA's memory analysis, and per Mosaic GPU kernel ptxas's registers, spills and
shared memory. Then (``--recurrent``, or alone with ``--only recurrent``) the recurrent families whose
``pallas_gpu`` does not claim ``gpu:aot`` (so has no case there), at the same ``[2, 8192, 16, 128]`` bf16,
``Dk = Dv = 128`` shape as the claimed ones. Needs the ``gpu-compile`` extra (``gpu-compile-cudnn`` for cuDNN):

    .venv-gpu/bin/python experiments/gpu_compile_report.py [--recurrent | --only recurrent] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from pallas_kernels.gpu import aot  # noqa: E402
from seqmix.ops import _registry  # noqa: E402
from tests.conformance import test_gpu_compile as cases  # noqa: E402

_CUDNN_FIELDS = re.compile(r'"mask_type": "(\w+)".*?"sliding_window_length": (\d+)', re.S)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _cudnn_note(compiled) -> str:
    text = compiled.as_text() if compiled is not None else ""
    notes = sorted({f"{m.group(1)}, window {m.group(2)}" for m in _CUDNN_FIELDS.finditer(text)})
    return "; ".join(notes)


def _no_kernels(calls) -> str:
    if any(c.startswith("mosaic_gpu") for c in calls):  # jax compiles a Mosaic GPU kernel once per process
        return "the same kernels as an earlier row (compiled once per process)"
    return "n/a (no Mosaic GPU kernel)"


def _row(impl, config, mode, r):
    kernels = "; ".join(f"{k.name}: {k.registers} regs, {k.spill_stores}/{k.spill_loads} B spill st/ld, "
                        f"smem {k.smem_bytes or 0} + {k.shared_bytes} B" for k in r.kernels)
    return {"impl": impl, "config": config, "mode": mode,
            "ok": "yes" if r.ok else f"no: {r.error.splitlines()[0][:160]}",
            "s": f"{r.seconds:.1f}", "calls": ", ".join(f"`{c}`" for c in r.custom_calls) or "-",
            "lib": _cudnn_note(r.compiled) or "-", "kernels": kernels or _no_kernels(r.custom_calls),
            "arg": _mib(r.memory.get("argument_size_in_bytes")), "temp": _mib(r.memory.get("temp_size_in_bytes"))}


RECURRENT = cases.Config((2, 8192, 16, 128), (2, 8192, 16, 128), {})  # Dk = Dv = 128


def recurrent_rows():
    out = []
    for name, fam in sorted(_registry.FAMILIES.items()):
        impl = fam.implementations.get("pallas_gpu")
        if fam.kind != "recurrent" or impl is None or "gpu:aot" in impl.evidence:  # those: rows()
            continue
        for mode in ("fwd", "fwd+bwd"):
            fn, args = cases.program(name, "pallas_gpu", RECURRENT, mode)
            r = aot.compile_for_h100(fn, args, keep_compiled=True)
            out.append(_row(f"{name}/pallas_gpu", f"{list(RECURRENT.q_shape)} Dv {RECURRENT.kv_shape[-1]}", mode, r))
            print(f"{name}/pallas_gpu {mode}: {out[-1]['ok']} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
    return out


def rows():
    out = []
    for cell, config, mode in cases.CASES:
        family, impl, _ = cell
        cfg = cases.CONFIGS[family][config]
        fn, args = cases.program(family, impl, cfg, mode)
        r = aot.compile_for_h100(fn, args, keep_compiled=True)
        shape = f"{list(cfg.q_shape)}" + (f" kv {list(cfg.kv_shape)}" if cfg.kv_shape != cfg.q_shape else "")
        out.append(_row(f"{family}/{impl}", f"{config} {shape}", mode, r))
        print(f"{family}/{impl} {config} {mode}: {out[-1]['ok']} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
    return out


def markdown(table) -> str:
    head = ["implementation", "config", "mode", "compiled", "seconds", "custom calls", "cuDNN mask",
            "Mosaic GPU kernels (ptxas)", "args MiB", "temp MiB"]
    keys = ["impl", "config", "mode", "ok", "s", "calls", "lib", "kernels", "arg", "temp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--recurrent", action="store_true", help="also the recurrent families' pallas_gpu")
    parser.add_argument("--only", choices=["recurrent"], default=None, help="only the recurrent families")
    args = parser.parse_args(argv)
    problem = aot.missing()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    table = [] if args.only else rows()
    if args.recurrent or args.only:
        table += recurrent_rows()
    text = f"jax {jax.__version__}, target {aot.TARGET_CONFIG.name}\n\n" + markdown(table)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
