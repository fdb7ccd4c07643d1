"""Neighborhood attention on 2-D grids: seqmix's ``xla`` form against the ``attention`` op with the same
pattern as an explicit mask, and against full attention, in one run; and the fraction of tiles skipped.

    python experiments/na_bench.py                                  # 64×64 and 128×128, kernel 7
    python experiments/na_bench.py --grids 64 --kernel 7 13 --out docs/bench/na_cpu.json --plot docs/bench/na_cpu.png

For every grid and kernel, forward and forward+backward, each candidate is compiled once and timed
(median of ``--repeats`` after a warm-up), with the fraction of matmul throughput as in
``experiments/bench.py`` (the matmul runs before every group). Candidates, B = 1, H = 4, D = 64, fp32:

* ``neighborhood_attention`` (``xla``): the NATTEN rule as a mask whose block bounds are computed;
* ``attention + Explicit``: the ``attention`` op with the same pattern as an explicit ``[T, T]`` table
  (block bounds from the table, each block's predicate a gather); up to ``--max-explicit-tokens``
  (4096): the table and its int32 summed-area table are constants of the program (1.3 GB at 128×128);
* ``attention (full)``: no mask; the dense cost the pattern is measured against.

Tiles: at the block size used (``--block``), the fraction of (query block, key block) pairs that are
non-empty and full, for the row-major order the op uses and, for comparison, a tile-major order (the grid
cut into ``tile × tile`` patches, each patch's tokens contiguous): does reordering tokens help at this
kernel size? The issue's target is ``time(NA) <= 2 × non-empty fraction × time(full)``; the JSON and the
table report the ratio ``time(NA) / (non-empty fraction × time(full))``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Roofline, _timed, loss_and_grads  # noqa: E402

from seqmix import ops  # noqa: E402
from seqmix.ops import block_meta  # noqa: E402
from seqmix.ops import masks as M  # noqa: E402

B, H, D = 1, 4, 64


def dense_pattern(mask) -> np.ndarray:
    """The mask's boolean ``[T, T]`` table, 512 query rows at a time."""
    t = mask.tokens
    kv = jnp.arange(t)[None, :]
    rows = jax.jit(lambda q: mask.allowed(M.Coords(q[:, None], q[:, None]), M.Coords(kv, kv)))
    return np.concatenate([np.asarray(rows(jnp.arange(s, min(s + 512, t)))) for s in range(0, t, 512)])


def tile_classes(table: np.ndarray, block: int) -> dict[str, float]:
    """Fractions of block pairs that are non-empty and full in a ``[T, T]`` table (T a multiple of block)."""
    nb = table.shape[0] // block
    blocks = table.reshape(nb, block, nb, block)
    any_, all_ = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
    return {"non_empty": float(any_.mean()), "full": float(all_.mean())}


def tile_major_order(grid: tuple[int, int], tile: tuple[int, int]) -> np.ndarray:
    """Row-major token indices listed patch by patch (``tile`` divides ``grid``)."""
    x, y = grid
    tx, ty = tile
    idx = np.arange(x * y).reshape(x // tx, tx, y // ty, ty)
    return idx.transpose(0, 2, 1, 3).reshape(-1)


def metadata_classes(mask, t: int, block: int) -> dict[str, float]:
    """The same fractions from the block metadata the implementations use (bounds, not the table)."""
    pos = jnp.arange(t, dtype=jnp.int32)
    cls = np.asarray(block_meta.classify_blocks(mask, pos, pos, pos[None], pos[None], None, None,
                                                jnp.ones(t, bool), block, block))
    return {"non_empty": float((cls != M.EMPTY).mean()), "full": float((cls == M.FULL).mean())}


def candidates(grid, kernel: int, table: np.ndarray, block: int, max_explicit: int):
    blocks = dict(block_q=block, block_kv=block)
    flat = lambda x: x.reshape((B, math.prod(grid)) + x.shape[-2:])  # noqa: E731
    cands = {
        "neighborhood_attention": lambda q, k, v: ops.neighborhood_attention(
            q, k, v, kernel_size=kernel, impl="xla", **blocks),
        "attention (full)": lambda q, k, v: ops.attention(flat(q), flat(k), flat(v), impl="xla", **blocks).reshape(q.shape),
    }
    if table.shape[0] <= max_explicit:  # the table and its int32 summed-area table are program constants
        explicit = M.Explicit(table)
        cands["attention + Explicit"] = lambda q, k, v: ops.attention(
            flat(q), flat(k), flat(v), mask=explicit, impl="xla", **blocks).reshape(q.shape)
    return cands


def measure(fn, args, mode, repeats):
    g = fn if mode == "fwd" else loss_and_grads(fn, 3)
    compiled = jax.jit(g).lower(*args).compile()
    mem = compiled.memory_analysis()
    return _timed(compiled, args, repeats), int(getattr(mem, "temp_size_in_bytes", -1))


def bench(grids, kernels, block, repeats, tile, roofline, max_explicit) -> tuple[list[dict], list[dict]]:
    rows, tiles = [], []
    for side in grids:
        grid = (side, side)
        t = side * side
        key = jax.random.split(jax.random.PRNGKey(side), 3)
        q, k, v = (jax.random.normal(kk, (B,) + grid + (H, D), jnp.float32) for kk in key)
        for kernel in kernels:
            mask = ops.neighborhood(grid, kernel)
            table = dense_pattern(mask)
            order = tile_major_order(grid, tile)
            tile_row = dict(grid=list(grid), kernel=kernel, block=block, tile=list(tile),
                            row_major=tile_classes(table, block),
                            row_major_metadata=metadata_classes(mask, t, block),
                            tile_major=tile_classes(table[np.ix_(order, order)], block),
                            allowed_fraction=float(table.mean()))
            tiles.append(tile_row)
            print(f"grid {side}x{side} kernel {kernel}: allowed {tile_row['allowed_fraction']:.2%} of pairs; "
                  f"non-empty tiles row-major {tile_row['row_major']['non_empty']:.2%} (metadata "
                  f"{tile_row['row_major_metadata']['non_empty']:.2%}), tile-major {tile}: "
                  f"{tile_row['tile_major']['non_empty']:.2%}", flush=True)
            flops_na = ops.useful_flops("neighborhood_attention", q, k, v, kernel_size=kernel)
            for mode in ("fwd", "fwd+bwd"):
                roofline.measure()
                group = []
                for name, fn in candidates(grid, kernel, table, block, max_explicit).items():
                    seconds, temp = measure(fn, (q, k, v), mode, repeats)
                    row = dict(impl=name, grid=list(grid), T=t, kernel=kernel, mode=mode, B=B, H=H, D=D,
                               dtype="float32", block=block, seconds=seconds, temp_bytes=temp)
                    roofline.annotate(row, ops.with_backward(flops_na) if mode == "fwd+bwd" else flops_na)
                    print(f"  {name:24s} {mode:8s} {seconds * 1e3:10.1f} ms  useful "
                          f"{row['fraction_of_matmul']:6.1%} of matmul  temp {temp / 2**20:8.1f} MiB", flush=True)
                    group.append(row)
                full = next(r["seconds"] for r in group if r["impl"] == "attention (full)")
                bound = tile_row["row_major"]["non_empty"] * full
                for row in group:
                    row["ratio_to_full"] = row["seconds"] / full
                    row["ratio_to_tile_bound"] = row["seconds"] / bound
                rows += group
    return rows, tiles


def markdown(rows, tiles) -> str:
    lines = ["| grid | kernel | mode | NA xla (ms) | attention + Explicit (ms) | full (ms) | non-empty tiles | "
             "NA / (non-empty × full) | NA useful fraction of matmul |", "|" + "---|" * 9]
    for tile in tiles:
        for mode in ("fwd", "fwd+bwd"):
            group = {r["impl"]: r for r in rows if r["grid"] == tile["grid"] and r["kernel"] == tile["kernel"]
                     and r["mode"] == mode}
            na = group["neighborhood_attention"]
            explicit = f"{group['attention + Explicit']['seconds'] * 1e3:.0f}" if "attention + Explicit" in group else "-"
            lines.append(f"| {tile['grid'][0]}×{tile['grid'][1]} | {tile['kernel']} | {mode} | "
                         f"{na['seconds'] * 1e3:.0f} | {explicit} | "
                         f"{group['attention (full)']['seconds'] * 1e3:.0f} | {tile['row_major']['non_empty']:.1%} | "
                         f"{na['ratio_to_tile_bound']:.2f} | {na['fraction_of_matmul']:.1%} |")
    lines += ["", "| grid | kernel | block | allowed pairs | non-empty (row-major) | full (row-major) | "
              f"non-empty (tile-major {tiles[0]['tile'][0]}×{tiles[0]['tile'][1]}) | full (tile-major) |",
              "|" + "---|" * 8]
    for tile in tiles:
        rm, tm = tile["row_major"], tile["tile_major"]
        lines.append(f"| {tile['grid'][0]}×{tile['grid'][1]} | {tile['kernel']} | {tile['block']} | "
                     f"{tile['allowed_fraction']:.2%} | {rm['non_empty']:.1%} | {rm['full']:.1%} | "
                     f"{tm['non_empty']:.1%} | {tm['full']:.1%} |")
    return "\n".join(lines)


def plot(rows, tiles, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = [f"{t['grid'][0]}², k{t['kernel']}" for t in tiles]
    width = 0.25
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for i, impl in enumerate(("neighborhood_attention", "attention + Explicit", "attention (full)")):
            vals = [next((r["seconds"] for r in rows if r["impl"] == impl and r["mode"] == mode
                          and r["grid"] == t["grid"] and r["kernel"] == t["kernel"]), np.nan) for t in tiles]
            ax.bar(np.arange(len(tiles)) + (i - 1) * width, vals, width, label=impl)
        bound = [t["row_major"]["non_empty"] * next(r["seconds"] for r in rows if r["impl"] == "attention (full)"
                 and r["mode"] == mode and r["grid"] == t["grid"] and r["kernel"] == t["kernel"]) for t in tiles]
        ax.scatter(np.arange(len(tiles)) - width, bound, marker="_", s=400, color="k",
                   label="non-empty tiles × full")
        ax.set_xticks(np.arange(len(tiles)), labels)
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("seconds (median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"2-D neighborhood attention, xla on {jax.default_backend()} (B={B}, H={H}, D={D}, fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[64, 128], help="square grid sides")
    ap.add_argument("--kernel", type=int, nargs="+", default=[7])
    ap.add_argument("--block", type=int, default=128, help="block_q = block_kv")
    ap.add_argument("--tile", type=int, nargs=2, default=[8, 16], help="patch of the tile-major comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-explicit-tokens", type=int, default=4096,
                    help="time the explicit-table mask up to this many tokens (its tables are [T, T] constants)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--out", default="na_bench.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    for side in args.grids:
        if (side * side) % args.block or side % args.tile[0] or side % args.tile[1]:
            ap.error(f"grid side {side}: side² must be a multiple of --block and side of each --tile entry")
    roofline = Roofline(args.matmul_size, args.repeats)
    rows, tiles = bench(args.grids, args.kernel, args.block, args.repeats, tuple(args.tile), roofline, args.max_explicit_tokens)
    meta = dict(jax=jax.__version__, backend=jax.default_backend(), machine=platform.machine(),
                cpu_count=__import__("os").cpu_count(), matmul=roofline.summary(), argv=sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows, tiles=tiles), indent=1))
    print(markdown(rows, tiles))
    if args.plot:
        plot(rows, tiles, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
