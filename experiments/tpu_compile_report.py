"""Ahead-of-time compilation of the Pallas TPU attention kernels for TPU generations, on a CPU host.

    PYTHONPATH=/path/to/libtpu_pkg JAX_PLATFORMS=cpu python experiments/tpu_compile_report.py
    python experiments/tpu_compile_report.py --gens v5e --configs causal --out /tmp/report.md

For every (shape × mask) config and generation it lowers and compiles the forward (``o``) and the
backward (``grad`` of q, k, v) of ``seqmix.ops.attention(..., impl="pallas_tpu")`` inside ``jax.jit``
with the Mosaic TPU compiler from ``libtpu`` (``jax.experimental.topologies.get_topology_desc``), and
reports: success, the tiles chosen, each Mosaic kernel's scoped VMEM (used / limit, from the compiled
HLO's ``used_scoped_memory_configs``), ``cost_analysis()`` flops and bytes (the kernels' own cost
estimates use the mask's block density for default positions), ``memory_analysis()`` temp bytes,
and the block density. Writes ``docs/tpu_compile_report.md``. Nothing runs on a TPU: these are
compile-time facts, not timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from seqmix import ops
from seqmix.ops.tpu import attention as attention_pallas
from seqmix.ops import masks as M

GENERATIONS = {  # name -> (topology name, chips_per_host_bounds)
    "v5e": ("v5e:2x2", (2, 2, 1)),
    "v5p": ("v5p:2x2x1", (2, 2, 1)),
    "v6e": ("v6e:2x2", (2, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    mask: Callable[[], M.Mask]
    dtype: str = "bfloat16"

    def label(self) -> str:
        heads = f"{self.q_heads}" if self.q_heads == self.kv_heads else f"{self.q_heads}:{self.kv_heads}"
        return f"{self.name} [{self.batch},{self.seq},{heads},{self.head_dim}]"


CONFIGS = {
    "causal": Config("causal", 2, 8192, 16, 16, 128, M.Causal),
    "gqa": Config("GQA causal", 2, 8192, 32, 8, 128, M.Causal),
    "window": Config("window 4096", 2, 8192, 16, 16, 128, lambda: M.LocalWindow(4096)),
}


def tpu_mesh(gen: str):
    """A one-device mesh on an abstract TPU topology (needs libtpu importable)."""
    from jax.experimental import topologies
    from jax.sharding import Mesh

    topo_name, bounds = GENERATIONS[gen]
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name,
                                        chips_per_host_bounds=bounds)
    return Mesh(topo.devices[:1], ("x",))


_KERNEL_RE = re.compile(r"%[\w.]*?(seqmix_flash_(?:fwd|dq|dkv))[\w.]* = .*custom_call_target=\"tpu_custom_call\"")
_USED_RE = re.compile(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"\d+","size":"(\d+)"')
_LIMIT_RE = re.compile(r'"scoped_memory_configs":\[\{"memory_space":"1","offset":"\d+","size":"(\d+)"')


def kernel_vmem(hlo_text: str, kernel_re: re.Pattern = _KERNEL_RE) -> dict[str, tuple[int, int]]:
    """{kernel name: (used scoped VMEM bytes, limit bytes)} of the Mosaic calls in compiled HLO whose
    name ``kernel_re`` captures (group 1)."""
    out = {}
    for line in hlo_text.split("\n"):
        m = kernel_re.search(line)
        if not m:
            continue
        used, limit = _USED_RE.search(line), _LIMIT_RE.search(line)
        out[m.group(1).rstrip("_")] = (int(used.group(1)) if used else -1, int(limit.group(1)) if limit else -1)
    return out


def make_fns(cfg: Config):
    mask = cfg.mask()

    def fwd(q, k, v):
        return ops.attention(q, k, v, mask=mask, impl="pallas_tpu")

    def bwd(q, k, v):
        def loss(q, k, v):
            return ops.attention(q, k, v, mask=mask, impl="pallas_tpu").astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return {"fwd": fwd, "bwd": bwd}


def _describe(cfg: Config, row: dict, q, k, v):
    """Record the tiles and the block density (prepare() needs arrays or tracers, not shape structs)."""
    call = ops.get_family("attention").prepare(q, k, v, mask=cfg.mask())
    row["tiles"] = attention_pallas.describe(call).split(": ", 1)[-1]
    p = attention_pallas.plan(call)
    row["density"] = attention_pallas.default_density(
        call.mask, cfg.seq, cfg.seq, p.tiles.block_q, p.tiles.block_kv_compute, p.padded_q, p.padded_kv)
    return q


def compile_one(cfg: Config, gen: str, mode: str, mesh=None) -> dict:
    """Compile one (config, generation, fwd|bwd); returns a row of facts (``ok`` False with ``error``)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = mesh or tpu_mesh(gen)
    sh = NamedSharding(mesh, P())
    dt = jnp.dtype(cfg.dtype)
    q = jax.ShapeDtypeStruct((cfg.batch, cfg.seq, cfg.q_heads, cfg.head_dim), dt, sharding=sh)
    kv = jax.ShapeDtypeStruct((cfg.batch, cfg.seq, cfg.kv_heads, cfg.head_dim), dt, sharding=sh)
    fn = make_fns(cfg)[mode]
    row = {"config": cfg.label(), "gen": gen, "mode": mode}
    t0 = time.perf_counter()
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            jax.eval_shape(lambda q, k, v: _describe(cfg, row, q, k, v), q, kv, kv)
            compiled = jax.jit(fn).lower(q, kv, kv).compile()
    except Exception as err:  # noqa: BLE001 - a report row, not a crash
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                   seconds=time.perf_counter() - t0)
        row["traceback"] = traceback.format_exc(limit=3)
        return row
    row["seconds"] = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    mem = compiled.memory_analysis()
    row.update(ok=True, flops=cost.get("flops"), bytes=cost.get("bytes accessed"),
               temp=getattr(mem, "temp_size_in_bytes", None),
               vmem=kernel_vmem(compiled.as_text()))
    return row


def _fmt_bytes(n) -> str:
    if n is None or n < 0:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_flops(n) -> str:
    return "n/a" if n is None else f"{n / 1e12:.2f} T"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Pallas TPU attention kernels: ahead-of-time compile report",
        "",
        "Generated by `experiments/tpu_compile_report.py` on a CPU host with the Mosaic TPU compiler",
        f"from libtpu (jax {jax.__version__}). Compile-time facts only: nothing here ran on a TPU.",
        "",
        "- **VMEM used / limit**: each Mosaic kernel's scoped VMEM from the compiled HLO",
        "  (`used_scoped_memory_configs` / `scoped_memory_configs`); `fwd` = `seqmix_flash_fwd`,",
        "  `dq` = `seqmix_flash_dq`, `dkv` = `seqmix_flash_dkv`.",
        "- **flops / bytes**: `compiled.cost_analysis()`; the kernels contribute their own",
        "  `pl.CostEstimate`, scaled by the **density** (non-empty fraction of (q block, kv block)",
        "  pairs for default positions), so a causal mask counts about half of the dense work.",
        "- **temp**: `compiled.memory_analysis().temp_size_in_bytes` (HBM scratch of the whole jitted",
        "  function: the `[B,T,H,D] -> [B,H,T,D]` relayouts of q, k, v (and o, dO, dq, dk, dv) dominate).",
        "",
        "| config | gen | pass | compiles | tiles | VMEM used / limit | flops | bytes | temp | density | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ok"):
            vm = ", ".join(f"{k.replace('seqmix_flash_', '')} {_fmt_bytes(u)} / {_fmt_bytes(lim)}"
                           for k, (u, lim) in sorted(r["vmem"].items()))
            lines.append(f"| {r['config']} | {r['gen']} | {r['mode']} | yes | {r['tiles']} | {vm} | "
                         f"{_fmt_flops(r['flops'])} | {_fmt_bytes(r['bytes'])} | {_fmt_bytes(r['temp'])} | "
                         f"{r['density']:.2f} | {r['seconds']:.1f} |")
        else:
            lines.append(f"| {r['config']} | {r['gen']} | {r['mode']} | **no**: {r['error']} | "
                         f"{r.get('tiles', '')} | | | | | | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gens", nargs="+", default=list(GENERATIONS), choices=list(GENERATIONS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "tpu_compile_report.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no device to share
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu is not importable: put it on PYTHONPATH (or install the `tpu` extra)", file=sys.stderr)
        return 2
    rows = []
    for gen in args.gens:
        mesh = tpu_mesh(gen)
        for name in args.configs:
            for mode in args.modes:
                row = compile_one(CONFIGS[name], gen, mode, mesh)
                status = "ok" if row["ok"] else f"FAILED {row['error']}"
                print(f"{gen} {name} {mode}: {status} ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
                rows.append(row)
    text = markdown(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
