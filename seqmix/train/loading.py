"""Load a trained run for use: ``seqmix.load(run_dir)`` returns the ``LM`` of its latest checkpoint.

A run directory (written by ``seqmix train``) holds ``config.json`` (the train and model configs) and
``checkpoints/<step>/`` (Orbax: parameters and optimizer state). Loading builds the model abstractly
from the saved ``LMConfig``, restores the parameters onto this machine's first device (whatever mesh
trained them) and merges them into a ready ``seqmix.models.LM``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained model with what it was trained with."""

    model: Any  # seqmix.models.LM
    train_config: Any  # seqmix.train.TrainConfig
    step: int  # the checkpoint's step


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """The model of checkpoint ``step`` (default: the latest finished one) of ``run_dir``, with its configs.

    Raises FileNotFoundError when the directory holds no run or no finished checkpoint."""
    from seqmix.models import LM, LMConfig
    from seqmix.train.checkpoint import Checkpointer
    from seqmix.train.config import TrainConfig
    from seqmix.train.trainer import OptimizerSettings, make_optimizer

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run} is not a seqmix run directory (no config.json); pass the --out of a "
                                f"`seqmix train` run")
    saved = json.loads(config_path.read_text())
    cfg = TrainConfig.from_dict(saved["train"])
    lm_config = LMConfig.from_dict(saved["model"])
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: LM(lm_config, rngs=nnx.Rngs(0))), nnx.Param, ...)
    opt_state = jax.eval_shape(make_optimizer(OptimizerSettings.of(cfg)).init, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {"params": params, "opt_state": opt_state})
    with Checkpointer(run / "checkpoints") as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{run / 'checkpoints'} holds no finished checkpoint")
        state, meta = ckpt.restore(template, step)
    return LoadedRun(model=nnx.merge(graphdef, state["params"], rest), train_config=cfg, step=int(meta["step"]))


def load(run_dir: str | Path, step: int | None = None):
    """The trained ``seqmix.models.LM`` of ``run_dir`` (checkpoint ``step``, default the latest)."""
    return load_run(run_dir, step).model
