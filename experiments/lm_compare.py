"""Byte-level LM across mixers at equal parameter count and step budget: validation bits per byte.

    python experiments/lm_compare.py                          # the comparison behind docs/mqar.md
    python experiments/lm_compare.py --quick --out /tmp/lm    # two mixers, a few steps (CI)
    python experiments/lm_compare.py --mixers attn gdn --steps 600 --plot lm.png --table lm.md

Every cell is ``seqmix train --task bytes`` (the main job: 2 layers, short conv 4, Python standard
library bytes) with the mixer's ``d_model`` chosen (a multiple of 8, 4 heads) so that its parameter
count is the closest to the reference model's (``attn*2`` at ``--d-model``). Records go to
``OUT/results.jsonl``; re-running skips finished cells and resumes an interrupted one.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _grid import parameter_count, parser, run_grid, save_figure  # noqa: E402

MIXERS = ("attn", "swa:32", "based", "gdn", "deltanet", "gla", "simple_gla", "retnet", "linear")
HEADS = 4


@functools.lru_cache(maxsize=None)
def count_params(spec: str, d_model: int) -> int:
    from flax import nnx

    from seqmix.models import LM, LMConfig

    model = nnx.eval_shape(lambda: LM(LMConfig(mixers=spec, d_model=d_model, num_heads=HEADS), rngs=nnx.Rngs(0)))
    return parameter_count(model)


def matched_width(spec: str, target: int) -> int:
    """The ``d_model`` (a multiple of 2·HEADS, so head dims are even) whose parameter count is closest to
    ``target``."""
    widths = range(2 * HEADS * 4, 2 * HEADS * 64 + 1, 2 * HEADS)
    lo, hi = 0, len(widths) - 1  # parameters grow with the width: bisect, then take the nearer neighbour
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count_params(spec, widths[mid]) < target else (lo, mid)
    return min(widths[max(lo - 1, 0): lo + 1], key=lambda d: abs(count_params(spec, d) - target))


def cells(mixers, d_model: int, layers: int, steps: int) -> list[dict]:
    target = count_params(f"attn*{layers}", d_model)
    out = []
    for m in mixers:
        spec = f"{m}*{layers}"
        d = matched_width(spec, target)
        out.append({"key": f"{m.replace(':', '')}-d{d}-s{steps}", "task": "bytes", "mixers": spec, "d_model": d,
                    "num_heads": HEADS, "steps": steps, "eval_every": steps, "ckpt_every": max(steps // 2, 1)})
    return out


def measure(result, cfg) -> dict:
    return {"val_bpb": result.final["val_bpb"], "params": parameter_count(result.model)}


def table(records: list[dict]) -> str:
    lines = ["| mixers | d_model | parameters | val bits/byte | wall (s) |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["val_bpb"]):
        lines.append(f"| `{r['mixers']}` | {r['d_model']} | {r['params']:,} | {r['val_bpb']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    records = sorted(records, key=lambda r: r["val_bpb"])
    fig = Figure(figsize=(7, 0.45 * len(records) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.barh([r["mixers"] for r in records], [r["val_bpb"] for r in records], color="C0")
    for i, r in enumerate(records):
        ax.text(r["val_bpb"], i, f" {r['val_bpb']:.3f}", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("validation bits per byte (lower is better)")
    ax.set_title(f"byte LM, {records[0]['steps']} steps, ~{records[0]['params'] / 1e6:.2f}M parameters each")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = parser(__doc__, MIXERS)
    ap.add_argument("--d-model", type=int, default=128, help="width of the attn*LAYERS reference")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("runs/lm_compare"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="write the markdown table here too")
    ap.add_argument("--quick", action="store_true", help="attn and gdn at width 32, 4 steps (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mixers, args.d_model, args.steps = ["attn", "gdn"], 32, 4
    records = run_grid(cells(args.mixers, args.d_model, args.layers, args.steps), args.out, measure,
                       desc="lm compare")
    text = table(records)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.plot:
        print(f"plot {plot(records, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
