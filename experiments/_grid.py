"""A resumable grid of ``seqmix`` training runs: one JSONL line per finished cell, a progress bar.

``run_grid(cells, out_dir, measure)`` trains every cell (a ``TrainConfig``-field dict with a ``key``)
whose key is not already in ``out_dir/results.jsonl``; a cell interrupted mid-run resumes from its own
checkpoints (``out_dir/runs/<key>``). ``measure(result, cfg) -> dict`` adds what the experiment records.
Used by ``mqar_sweep.py`` and ``lm_compare.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import jax
from flax import nnx


def parser(doc: str, mixers) -> argparse.ArgumentParser:
    """The arguments both experiments share: ``--mixers`` (default ``mixers``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--mixers", nargs="+", default=list(mixers))
    return ap


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def state_size(model, seq_len: int) -> int:
    """Floats a model keeps per sequence to decode token ``seq_len``: every float leaf of its decode caches
    (a KV cache grows with the length, a recurrent state does not; short-conv caches count too)."""
    caches = jax.eval_shape(lambda: model.init_cache(1, seq_len))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(caches) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating))


def parameter_count(model) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def run_grid(cells: list[dict], out_dir: Path, measure: Callable[..., dict], *, desc: str) -> list[dict]:
    """Train every cell not yet recorded; return all records (old and new) of these cells' keys."""
    from tqdm.auto import tqdm

    from seqmix.train import TrainConfig, train

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    done = {r["key"]: r for r in read_results(path)}
    todo = [c for c in cells if c["key"] not in done]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=desc, unit="run", dynamic_ncols=True)
    try:
        for cell in todo:
            fields = {k: v for k, v in cell.items() if k != "key"}
            run_dir = out_dir / "runs" / cell["key"]
            resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            if "task" not in fields:  # for_task would silently train the main job's default task
                raise ValueError(f"grid cell {cell['key']!r} names no task")
            cfg = TrainConfig.for_task(out=str(run_dir), **fields)
            bar.set_postfix_str(f"{cell['key']}{' (resuming)' if resume else ''}")
            result = train(cfg, resume=resume, progress=False, log=lambda msg: None)
            record = {"key": cell["key"], **fields, "wall_s": round(result.summary.get("total_elapsed_s",
                                                                                       result.wall_s), 1),
                      **measure(result, cfg)}
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[cell["key"]] = record
            bar.update(1)
    finally:
        bar.close()
    return [done[c["key"]] for c in cells if c["key"] in done]
