"""Orbax checkpoints of a training run: arrays (parameters, optimizer state) plus JSON metadata.

Each checkpoint step directory holds two items:

* ``state``: the array pytree, stored as nested dicts named by the pytree paths
  (``params/blocks/0/mixer/q_proj/kernel/value``, ``opt_state/1/0/mu/...``), so it is readable without
  seqmix and independent of how the containers (NNX ``State``, optax states) flatten;
* ``meta``: JSON with the step, the data-loader position (the data order is keyed by ``(seed, step)``,
  so the position *is* the step) and the run and model configs.

Restoring takes a template tree (a freshly initialized state of the same config): its structure gives
the containers back and its shardings place the restored arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths_and_leaves(tree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def to_nested_dict(tree) -> dict:
    """The leaves of ``tree`` as nested dicts keyed by their path names."""
    out: dict = {}
    paths, leaves, _ = _paths_and_leaves(tree)
    for path, leaf in zip(paths, leaves):
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint: pytree path {'/'.join(path)} collides with a leaf")
        if path[-1] in node:
            raise ValueError(f"checkpoint: two leaves share the path {'/'.join(path)}")
        node[path[-1]] = leaf
    return out


def from_nested_dict(nested: dict, template):
    """Inverse of :func:`to_nested_dict`, with the containers of ``template``."""
    paths, _, treedef = _paths_and_leaves(template)
    leaves = []
    for path in paths:
        node = nested
        for name in path:
            if not isinstance(node, dict) or name not in node:
                raise ValueError(f"checkpoint has no array at {'/'.join(path)}: was it written by a "
                                 f"different model or optimizer config?")
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for (array tree, JSON meta) pairs.

    Saves are synchronous: the train step donates its input buffers, so the arrays must be written
    before the next step reuses them.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, tree, meta: dict[str, Any]) -> None:
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(to_nested_dict(tree)), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, template, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(tree, meta)`` of checkpoint ``step`` (default: the latest), shaped and sharded like ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_nested_dict(template))
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return from_nested_dict(restored["state"], template), dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
