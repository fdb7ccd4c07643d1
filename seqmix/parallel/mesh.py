"""Mesh axis names and a validated mesh constructor (DESIGN.md §6, §7).

seqmix meshes have (up to) four named axes, outermost first::

    ("data", "fsdp", "seq", "tensor")

``data`` and ``fsdp`` shard the batch (and, for ``fsdp``, parameters), ``seq`` is the sequence axis the
strategies of :mod:`seqmix.parallel` communicate over, ``tensor`` shards heads. A mesh may use any
subset of them (in this order); an axis of size 1 costs nothing.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "seq", "tensor")
DATA, FSDP, SEQ, TENSOR = AXES
BATCH_AXES = ("data", "fsdp")  # the axes a batch dimension is sharded over


def make_mesh(shape: Mapping[str, int], *, devices: Sequence | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes named from :data:`AXES`.

    ``shape`` maps axis names to sizes, e.g. ``{"data": 2, "seq": 4}``; axes are ordered as in
    :data:`AXES` whatever the order of the mapping. The product of the sizes must equal the number of
    ``devices`` (default: all of ``jax.devices()``). The mesh's axes are of type ``Auto``, so
    ``jax.shard_map`` accepts unsharded inputs and reshards them.
    """
    if not isinstance(shape, Mapping) or not shape:
        raise ValueError(f"shape must be a non-empty mapping of axis name -> size, e.g. {{'seq': 4}}; got {shape!r}")
    unknown = [name for name in shape if name not in AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis name(s) {unknown}; seqmix axes are {list(AXES)}")
    for name, size in shape.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have an int size >= 1; got {size!r}")
    names = tuple(a for a in AXES if a in shape)
    sizes = tuple(int(shape[a]) for a in names)
    devs = list(jax.devices() if devices is None else devices)
    total = int(np.prod(sizes))
    if total != len(devs):
        raise ValueError(f"mesh shape {dict(zip(names, sizes))} needs {total} devices; got {len(devs)} "
                         f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={total} before importing jax)")
    arr = np.asarray(devs, dtype=object).reshape(sizes)
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is not None:
        return Mesh(arr, names, axis_types=(auto.Auto,) * len(names))
    return Mesh(arr, names)


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of ``axis`` in ``mesh`` (a clear error when the mesh lacks it)."""
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {list(mesh.axis_names)}")
    return int(mesh.shape[axis])


def batch_axes(mesh: Mesh, exclude: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The batch-sharding axes of ``mesh`` present and of size > 1 (None when there are none)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in exclude and mesh.shape[a] > 1)
    return axes or None
