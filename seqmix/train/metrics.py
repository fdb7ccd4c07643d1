"""Run metrics: one JSON object per line (``metrics.jsonl``) and a PNG plot of the curves.

Train lines: ``{"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}``
(``loss`` and ``grad_norm`` are means over the steps since the previous train line).
Eval lines: ``{"kind": "eval", "step", "elapsed_s", "val_loss", ...task metrics}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item"):  # numpy / jax scalars
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends metric records to a JSONL file, flushing every line (a killed run loses nothing).

    ``truncate_after``: on resume, drop the lines for steps after the checkpoint first, so the file reads
    like one uninterrupted run.
    """

    def __init__(self, path: str | Path, *, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif truncate_after is None:
            self.path.write_text("")
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file (blank or torn last lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(records: Iterable[dict[str, Any]], path: str | Path, *, metric: str,
                 baseline: float | None = None, baseline_label: str = "", title: str = "") -> Path:
    """Train and validation loss vs step (left) and the validation ``metric`` vs step (right)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, renders with Agg

    records = list(records)
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    points = [r for r in evals if r.get(metric) is not None]
    ax_metric.plot([r["step"] for r in points], [r[metric] for r in points], "o-", color="C1", label=metric)
    if baseline is not None:
        ax_metric.axhline(baseline, color="gray", ls="--", label=baseline_label or "baseline")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(metric)
    ax_metric.legend()
    ax_metric.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
