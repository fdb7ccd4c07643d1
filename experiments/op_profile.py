"""Where one compiled op spends its time on CPU: XLA:CPU's per-instruction trace, summed by what each
instruction computes.

XLA:CPU runs a compiled program as a sequence of thunks (one per fused HLO instruction); with
``--xla_cpu_enable_xprof_traceme`` each thunk records a trace event, which ``jax.profiler`` collects. This
script compiles one call (forward, or forward+backward: the value and gradient of ``sum(o)`` in every array
argument, ``bench.loss_and_grads``), runs it ``--repeats`` times under the profiler and reports, per call:

* the wall time, and the sum of the instructions' own times (over both worker threads: it can exceed the
  wall time when the two cores overlap work; control-flow instructions, whose events enclose the
  instructions of their bodies, are listed apart and left out of the sum);
* the time per *kind* of work: ``matmul`` for dots (XLA's own or a YNNPACK dot fusion), else the JAX
  primitive at the root of each fused instruction, read from its ``op_name`` metadata (``exp``,
  ``transpose``, ``select_n``, ...; ``fusion`` where the metadata names none);
* the slowest instructions, with their shapes;
* the FLOPs its dots compute (:func:`dot_flops`, while loops counted per iteration) beside the useful
  count of the family record: their ratio bounds the fraction of matmul the op can reach.

    python experiments/op_profile.py --family gla --seq 2048 --mode fwd+bwd
    python experiments/op_profile.py --family attention --mask causal --seq 8192 --out profile.json

Families: ``attention`` (``--mask causal | full | window:W``) and every recurrent family, with the inputs
``experiments/bench.py`` times (fp32, B = 1, H = 4, D = 64 by default).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench  # noqa: E402
from seqmix import ops  # noqa: E402
from seqmix.parallel.hlo import executed_lines  # noqa: E402

CONTROL_FLOW = ("while", "conditional", "call")


def instructions(hlo_text: str) -> dict[str, dict]:
    """name -> {shape, opcode, kind} for every instruction of the compiled HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (\S+(?:\{[^}]*\})?) (\w[\w-]*)\(", line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        if m.group(3) == "dot" or '"kind":"__ynn' in line:  # a dot, or a dot fusion run by YNNPACK
            kind = "matmul"
        else:
            kind = op_name.group(1).rsplit("/", 1)[-1] if op_name else m.group(3)
        out[m.group(1)] = dict(shape=m.group(2), opcode=m.group(3), kind=kind)
    return out


def dot_flops(hlo_text: str) -> float:
    """FLOPs of every dot the compiled program runs (``2·K`` per output element, K the contracted size), each
    as many times as it runs (:func:`seqmix.parallel.hlo.executed_lines`: a while body per iteration; a
    conditional's branches all count, an upper bound). What the program computes in matmuls, to set beside
    the family record's useful count."""
    lines, _ = executed_lines(hlo_text)
    shapes = {}
    for line, _ in lines:
        inst = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
        if inst:
            shapes[inst.group(1)] = [int(x) for x in inst.group(2).split(",") if x]
    flops = 0.0
    for line, times in lines:
        dot = re.match(r"^\s+(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\][^ ]* dot\(%([\w.\-]+), .*"
                       r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if dot:
            k = np.prod([shapes[dot.group(2)][int(d)] for d in dot.group(3).split(",") if d])
            flops += times * 2.0 * float(k) * float(np.prod([int(x) for x in dot.group(1).split(",") if x]))
    return flops


def thunk_times(compiled, args, repeats: int) -> dict[str, float]:
    """Instruction name -> seconds per call, from the profiler's host trace."""
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory(prefix="seqmix_op_profile_") as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(repeats):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns * 1e-9 / repeats
    return totals


def call_of(args) -> tuple:
    """(function, array arguments, forward useful FLOPs) for the chosen family and shape."""
    if args.family == "attention":
        mask = bench.parse_mask(args.mask)
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(kk, (args.batch, args.seq, args.heads, args.head_dim)) for kk in keys)
        return (lambda q, k, v: ops.attention(q, k, v, mask=mask, impl=args.impl)), (q, k, v), \
            ops.useful_flops("attention", q, k, v, mask=mask)
    pos, kw = bench.recurrent_inputs(args.family, args.batch, args.seq, args.heads, args.head_dim, jnp.float32)
    op = ops.get_family(args.family).op
    return (lambda *a: op(*a, impl=args.impl, **kw)), tuple(pos), ops.useful_flops(args.family, *pos, **kw)


def profile(args) -> dict:
    f, arrays, fwd_flops = call_of(args)
    n = 3 if args.family == "attention" else len(arrays)
    g = f if args.mode == "fwd" else bench.loss_and_grads(f, n)
    compiled = jax.jit(g).lower(*arrays).compile()
    table = instructions(compiled.as_text())
    computed = dot_flops(compiled.as_text())
    jax.block_until_ready(compiled(*arrays))
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(compiled(*arrays))
    wall = (time.perf_counter() - t0) / args.repeats
    times = thunk_times(compiled, arrays, args.repeats)
    ops_ = [dict(name=n, seconds=s, **table[n]) for n, s in times.items() if n in table]
    flat = [o for o in ops_ if o["opcode"] not in CONTROL_FLOW]
    by_kind = collections.Counter()
    for o in flat:
        by_kind[o["kind"]] += o["seconds"]
    flops = ops.with_backward(fwd_flops) if args.mode == "fwd+bwd" else fwd_flops
    return dict(family=args.family, mask=args.mask if args.family == "attention" else None, impl=args.impl,
                mode=args.mode, B=args.batch, T=args.seq, H=args.heads, D=args.head_dim, wall_seconds=wall,
                useful_flops=flops, dot_flops=computed, instruction_seconds=sum(o["seconds"] for o in flat),
                by_kind=dict(by_kind.most_common()),
                control_flow=sorted((o for o in ops_ if o["opcode"] in CONTROL_FLOW), key=lambda o: -o["seconds"]),
                top=sorted(flat, key=lambda o: -o["seconds"])[:args.top], jax=jax.__version__)


def report(r: dict) -> str:
    lines = [f"{r['family']} ({r['impl']}, {r['mode']}, B={r['B']} T={r['T']} H={r['H']} D={r['D']}"
             f"{', mask ' + r['mask'] if r['mask'] else ''}): {r['wall_seconds'] * 1e3:.1f} ms per call, "
             f"instructions sum {r['instruction_seconds'] * 1e3:.1f} ms (both threads), "
             f"{r['useful_flops'] / r['wall_seconds'] / 1e9:.1f} useful GFLOP/s; the dots compute "
             f"{r['dot_flops'] / 1e9:.3f} GFLOP for {r['useful_flops'] / 1e9:.3f} useful "
             f"(useful / computed {r['useful_flops'] / max(r['dot_flops'], 1.0):.3f})", "", "| kind | ms | share |",
             "|---|---|---|"]
    total = r["instruction_seconds"]
    for kind, s in r["by_kind"].items():
        if s >= 0.005 * total:
            lines.append(f"| {kind} | {s * 1e3:.2f} | {s / total:.0%} |")
    lines += ["", "| instruction | kind | shape | ms |", "|---|---|---|---|"]
    lines += [f"| {o['name']} | {o['kind']} | `{o['shape']}` | {o['seconds'] * 1e3:.2f} |" for o in r["top"]]
    if r["control_flow"]:
        lines += ["", "Control flow (each encloses the instructions of its body): " + ", ".join(
            f"{o['name']} {o['seconds'] * 1e3:.1f} ms" for o in r["control_flow"][:6])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="attention", choices=sorted(ops.FAMILIES))
    p.add_argument("--impl", default="xla")
    p.add_argument("--mask", default="causal", help="attention only: causal | full | window:W")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.family != "attention" and ops.get_family(args.family).kind != "recurrent":
        p.error(f"--family {args.family}: only attention and the recurrent families have inputs here")
    result = profile(args)
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
