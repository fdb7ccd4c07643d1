"""Training tasks: a registry of data sources the trainer can fit a language model to.

A task is an object with

* ``name`` and ``vocab_size``;
* ``batch(step, batch_size, seq_len) -> dict`` with ``inputs`` and ``targets`` (int32 ``[B, T]``) and
  ``loss_mask`` (float32 ``[B, T]``, 1 where the target counts). It is a pure function of
  ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would;
* ``eval_batches(batch_size, seq_len) -> list[dict]``: a fixed validation set, disjoint from training;
* ``check(seq_len)``: raises ``ValueError`` when the task cannot be built at that length;
* ``metrics(loss, accuracy) -> dict``: validation metrics from the mean masked loss (nats) and the
  masked next-token accuracy; ``primary_metric`` names the one to report;
* ``summary() -> dict``: facts worth printing beside the result (corpus size, baselines), and
  ``describe() -> str``: the same in one line;
* ``sample_prompts``: byte strings to continue (sampled) at the end of a run (may be empty);
* ``train_defaults`` (optional): ``TrainConfig`` fields that differ from the main job's defaults for
  this task (``TrainConfig.for_task`` and ``seqmix train --task`` apply them to flags not given).

``get_task(name, **opts)`` builds one; ``TASKS`` maps names to constructors.
"""

from __future__ import annotations

from typing import Any, Callable

from seqmix.train.tasks.bytes_lm import BytesLM, load_stdlib_corpus, unigram_entropy_bits
from seqmix.train.tasks.mqar import MQAR

TASKS: dict[str, Callable[..., Any]] = {"bytes": BytesLM, "mqar": MQAR}


def get_task(name: str, **opts):
    """Build the task ``name`` with its options (see each task class); unknown names raise ValueError."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    return cls(**opts)


__all__ = ["BytesLM", "MQAR", "TASKS", "get_task", "load_stdlib_corpus", "unigram_entropy_bits"]
