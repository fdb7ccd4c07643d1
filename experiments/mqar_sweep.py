"""Zoology-style MQAR sweep: mixers × model width × key-value pairs, accuracy against recurrent state size.

    python experiments/mqar_sweep.py                          # the CPU-sized sweep behind docs/mqar.md
    python experiments/mqar_sweep.py --quick --out /tmp/mq    # two mixers, one width, a few steps (CI)
    python experiments/mqar_sweep.py --mixers gdn based --widths 64 128 --pairs 4 8 16

Every cell is ``seqmix train --task mqar`` (2 layers of the mixer, short conv 4, the task's defaults
otherwise) at one ``d_model`` and ``num_kv_pairs``; its record (``OUT/results.jsonl``) holds the final
validation accuracy, the parameter count and the **state size**: the floats the model keeps per sequence
to decode the last token (all layers' decode caches: a KV cache grows with the sequence, a recurrent
state does not). Re-running skips finished cells and resumes an interrupted one. The plot (``--plot``)
is the Based paper's recall-memory trade-off: accuracy against state size, one line per mixer, one
panel per number of pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _grid import parameter_count, parser, run_grid, save_figure, state_size  # noqa: E402

MIXERS = ("attn", "based", "gdn", "deltanet", "gla", "simple_gla", "retnet", "linear")
WIDTHS = (32, 64, 128)
PAIRS = (4, 8, 16)


def cells(mixers, widths, pairs, seq_len: int, steps: int, layers: int) -> list[dict]:
    return [{"key": f"mqar-{m}-d{d}-p{p}-t{seq_len}-s{steps}", "task": "mqar", "mixers": f"{m}*{layers}", "d_model": d,
             "num_heads": max(1, d // 32), "num_kv_pairs": p, "seq_len": seq_len, "steps": steps,
             "eval_every": steps, "ckpt_every": max(steps // 2, 1)}
            for p in pairs for d in widths for m in mixers]


def measure(result, cfg) -> dict:
    return {"val_acc": result.final["val_acc"], "params": parameter_count(result.model),
            "state_size": state_size(result.model, cfg.seq_len)}


def plot(records: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    pairs = sorted({r["num_kv_pairs"] for r in records})
    fig = Figure(figsize=(4.5 * len(pairs), 4), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, p in zip(axes, pairs):
        for i, mixer in enumerate(dict.fromkeys(r["mixers"] for r in records)):
            pts = sorted((r["state_size"], r["val_acc"]) for r in records
                         if r["mixers"] == mixer and r["num_kv_pairs"] == p)
            ax.plot(*zip(*pts), "o-", color=f"C{i % 10}", label=mixer)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (3×10³, 4×10³, ...) overlap
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("state size (floats per sequence, all layers)")
        ax.set_title(f"{p} key-value pairs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MQAR validation accuracy")
    axes[-1].legend(fontsize="small")
    fig.suptitle(f"MQAR, sequence length {records[0]['seq_len']}, {records[0]['steps']} steps per run")
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = parser(__doc__, MIXERS)
    ap.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="d_model values")
    ap.add_argument("--pairs", nargs="+", type=int, default=list(PAIRS), help="num_kv_pairs values")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/mqar_sweep"), help="results.jsonl and run dirs")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of accuracy vs state size")
    ap.add_argument("--quick", action="store_true", help="attn and gdn, width 32, 4 pairs, 8 steps (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.mixers, args.widths, args.pairs, args.seq_len, args.steps = ["attn", "gdn"], [32], [4], 32, 8
    grid = cells(args.mixers, args.widths, args.pairs, args.seq_len, args.steps, args.layers)
    records = run_grid(grid, args.out, measure, desc="mqar sweep")
    for r in records:
        print(json.dumps({k: r[k] for k in ("mixers", "d_model", "num_kv_pairs", "state_size", "params",
                                             "val_acc", "wall_s")}))
    if args.plot:
        print(f"plot {plot(records, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
