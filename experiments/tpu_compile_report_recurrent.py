"""Ahead-of-time compilation of the Pallas TPU recurrent kernels for TPU generations, on a CPU host.

    PYTHONPATH=/path/to/libtpu_pkg JAX_PLATFORMS=cpu python experiments/tpu_compile_report_recurrent.py
    python experiments/tpu_compile_report_recurrent.py --gens v5e --families gla --out /tmp/report.md

For every family and generation it lowers and compiles, inside ``jax.jit``, the forward (``o`` and the
final state) and the backward (``grad`` of q, k, v and g / β) of the family's op with
``impl="pallas_tpu"`` at ``[B, T, H, D] = [2, 8192, 16, 128]`` bf16 (Dk = Dv = 128, default chunk 64),
with the Mosaic TPU compiler from ``libtpu`` (``jax.experimental.topologies.get_topology_desc``), and
reports: success, the kernel description, each Mosaic kernel's scoped VMEM (used / limit, from the
compiled HLO), ``cost_analysis()`` flops and bytes, ``memory_analysis()`` temp bytes. Writes
``docs/tpu_compile_report_recurrent.md``. Compile-time facts only; nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from seqmix import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tpu_compile_report as attention_report  # noqa: E402  (shared AOT helpers: meshes, VMEM parsing, formatting)
from tpu_compile_report import GENERATIONS, _fmt_bytes, _fmt_flops, tpu_mesh  # noqa: E402,F401

FAMILIES = tuple(n for n in sorted(ops.FAMILIES) if ops.FAMILIES[n].kind == "recurrent"
                 and "pallas_tpu" in ops.FAMILIES[n].implementations)
SHAPE = (2, 8192, 16, 128)

_KERNEL_RE = re.compile(
    r"%[\w.]*?(seqmix_(?:gla|delta)_(?:fwd|bwd)\w*?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"")


def kernel_vmem(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{kernel name: (used scoped VMEM bytes, limit bytes)} of the recurrent Mosaic calls in compiled HLO."""
    return attention_report.kernel_vmem(hlo_text, _KERNEL_RE)


def inputs(family: str, sharding, shape=SHAPE):
    """Abstract positional and keyword arrays of ``family``'s op (from its record's input factory), bf16
    q/k/v, and its static options."""
    fam = ops.get_family(family)
    b, t, h, d = shape
    holder = {}

    def arrays(key):
        inp = fam.make_inputs(fam, key, batch=b, seq=t, heads=h, dk=d, dv=d, dtype=jnp.bfloat16, initial_state=False)
        holder["options"] = inp.options
        return inp.args, inp.arrays

    shapes = jax.eval_shape(arrays, jax.random.PRNGKey(0))
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    args, kw = jax.tree_util.tree_map(spec, shapes)
    return args, kw, holder["options"]


def make_fns(family: str, options):
    fam = ops.get_family(family)

    def fwd(args, kw):
        return fam.op(*args, **kw, **options, return_state=True, impl="pallas_tpu")

    def bwd(args, kw):
        diff = {n: x for n, x in kw.items() if fam.arg(n).differentiable}
        fixed = {n: x for n, x in kw.items() if n not in diff}

        def loss(args, diff):
            o, s = fam.op(*args, **diff, **fixed, **options, return_state=True, impl="pallas_tpu")
            return o.astype(jnp.float32).sum() + s.sum()
        return jax.grad(loss, argnums=(0, 1))(args, diff)

    return {"fwd": fwd, "bwd": bwd}


def describe(family: str, args, kw, options) -> str:
    """The implementation's ``describe`` for abstract inputs (prepare runs on tracers inside eval_shape)."""
    fam = ops.get_family(family)
    out = {}

    def probe(args, kw):
        call = fam.prepare(*args, **kw, **options)
        out["text"] = fam.implementations["pallas_tpu"].describe(call)
        return args[0]

    jax.eval_shape(probe, args, kw)
    return out["text"]


def compile_one(family: str, gen: str, mode: str, mesh=None, shape=SHAPE) -> dict:
    """Compile one (family, generation, fwd|bwd); returns a row (``ok`` False with ``error``)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = mesh or tpu_mesh(gen)
    args, kw, options = inputs(family, NamedSharding(mesh, P()), shape)
    fn = make_fns(family, options)[mode]
    row = {"family": family, "gen": gen, "mode": mode, "shape": list(shape)}
    t0 = time.perf_counter()
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            row["kernel"] = describe(family, args, kw, options)
            compiled = jax.jit(fn).lower(args, kw).compile()
    except Exception as err:  # noqa: BLE001 - a report row, not a crash
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                   seconds=time.perf_counter() - t0, traceback=traceback.format_exc(limit=3))
        return row
    row["seconds"] = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    mem = compiled.memory_analysis()
    row.update(ok=True, flops=cost.get("flops"), bytes=cost.get("bytes accessed"),
               temp=getattr(mem, "temp_size_in_bytes", None), vmem=kernel_vmem(compiled.as_text()))
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Pallas TPU recurrent kernels: ahead-of-time compile report",
        "",
        "Generated by `experiments/tpu_compile_report_recurrent.py` on a CPU host with the Mosaic TPU",
        f"compiler from libtpu (jax {jax.__version__}). Compile-time facts only: nothing here ran on a TPU.",
        f"Shape `[B, T, H, D] = {list(SHAPE)}` bf16, Dk = Dv = 128, default chunk 64; `fwd` = o and final",
        "state, `bwd` = grad of (sum o + sum final_state) w.r.t. q, k, v and g / β, both inside `jax.jit`.",
        "",
        "- **VMEM used / limit**: each Mosaic kernel's scoped VMEM from the compiled HLO (limit n/a:",
        "  Mosaic's default scoped limit, the kernels set no `vmem_limit_bytes`).",
        "- **flops / bytes**: `compiled.cost_analysis()` (the kernels' own `pl.CostEstimate` plus XLA glue).",
        "- **temp**: `compiled.memory_analysis().temp_size_in_bytes` (HBM scratch of the jitted function:",
        "  layout transposes and, for `bwd`, the saved chunk-start states `[B, H, T/64, 128, 128]` fp32 = 256 MiB).",
        "",
        "| family | gen | pass | compiles | kernel | VMEM used / limit | flops | bytes | temp | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ok"):
            vm = ", ".join(f"{k.replace('seqmix_', '')} {_fmt_bytes(u)} / {_fmt_bytes(lim)}"
                           for k, (u, lim) in sorted(r["vmem"].items()))
            lines.append(f"| {r['family']} | {r['gen']} | {r['mode']} | yes | {r['kernel']} | {vm} | "
                         f"{_fmt_flops(r['flops'])} | {_fmt_bytes(r['bytes'])} | {_fmt_bytes(r['temp'])} | "
                         f"{r['seconds']:.1f} |")
        else:
            lines.append(f"| {r['family']} | {r['gen']} | {r['mode']} | **no**: {r['error']} | "
                         f"{r.get('kernel', '')} | | | | | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gens", nargs="+", default=list(GENERATIONS), choices=list(GENERATIONS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"
                                             / "tpu_compile_report_recurrent.md"))
    args = parser.parse_args(argv)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu is not importable: put it on PYTHONPATH (or install the `tpu` extra)", file=sys.stderr)
        return 2
    rows = []
    for gen in args.gens:
        mesh = tpu_mesh(gen)
        for family in args.families:
            for mode in args.modes:
                row = compile_one(family, gen, mode, mesh)
                status = "ok" if row["ok"] else f"FAILED {row['error']}"
                print(f"{gen} {family} {mode}: {status} ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
                rows.append(row)
    text = markdown(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
