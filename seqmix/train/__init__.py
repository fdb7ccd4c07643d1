"""Training: the trainer behind ``seqmix train``, its tasks, checkpoints and metrics.

    from seqmix.train import TrainConfig, train
    result = train(TrainConfig.for_task("mqar", mixers="gdn*2", out="runs/mqar"))  # the task's defaults + these
    result.final, result.model          # final validation metrics, the trained seqmix.models.LM

The trainer's heavy imports (optax, Orbax, matplotlib) load on first use, so the command line stays
quick for ``--help`` and bad flags.
"""

from __future__ import annotations

import importlib

from seqmix.train.config import MESH_AXES, TrainConfig, parse_mesh
from seqmix.train.tasks import TASKS, get_task

_LAZY = {
    "train": "seqmix.train.trainer", "prepare": "seqmix.train.trainer", "RunResult": "seqmix.train.trainer",
    "make_mesh": "seqmix.train.trainer", "format_report": "seqmix.train.trainer",
    "Checkpointer": "seqmix.train.checkpoint",
    "MetricsWriter": "seqmix.train.metrics", "read_metrics": "seqmix.train.metrics",
    "plot_metrics": "seqmix.train.metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seqmix.train' has no attribute {name!r}")


__all__ = ["MESH_AXES", "TASKS", "TrainConfig", "get_task", "parse_mesh", *_LAZY]
