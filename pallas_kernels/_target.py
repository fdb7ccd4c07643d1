"""The one place that knows what a trace is for: platform, device kind, and whether kernels are interpreted.

Dispatch (``seqmix.ops._registry``), tile tables and kernel glue all ask :func:`current` instead of
``jax.default_backend()``, because the two differ whenever a program is lowered ahead of time:

* inside ``jax.shard_map`` over a mesh of TPU devices from ``jax.experimental.topologies`` (or under
  ``jax.sharding.use_abstract_mesh(mesh.abstract_mesh)``), the abstract mesh names the target TPU while
  the default backend is still ``"cpu"``;
* otherwise the default backend is the target.

Interpret mode (:func:`interpret_params`): a Pallas TPU kernel is compiled by Mosaic when the target is a
TPU and runs in the TPU interpreter (``pltpu.InterpretParams``: simulated VMEM/SMEM, DMAs and grid order,
NaN-filled uninitialized memory, out-of-bounds reads raise) when the target is the CPU. On a GPU it can do
neither, so :func:`backend_problem` names why and dispatch fails loudly instead of interpreting.

``force(mode)`` overrides the interpret choice inside a ``with`` block (``"compiled"``, ``"tpu"``,
``"hlo"`` = ``interpret=True``, ``"tpu_races"`` = InterpretParams with the race detector); the
environment variable ``SEQMIX_PALLAS_INTERPRET`` sets the same modes process-wide.

Only jax is imported here: this module sits below ``seqmix`` (DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import jax

try:  # the location of InterpretParams moved over jax versions; the public name did not
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - a jax without Pallas TPU
    _pltpu = None

MODES = ("compiled", "tpu", "hlo", "tpu_races", "gpu_races")
PLATFORMS = ("cpu", "gpu", "tpu")
_state = threading.local()


@dataclasses.dataclass(frozen=True)
class Target:
    """What the current trace compiles for.

    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; device_kind: e.g. ``"TPU v5 lite"`` (None on CPU);
    ahead_of_time: True when the target comes from an abstract mesh rather than the default backend.
    """

    platform: str
    device_kind: str | None
    ahead_of_time: bool


def _normalize(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def _abstract_device():
    """The device of the abstract mesh being traced for (shard_map bodies, AOT lowering), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is None:  # pragma: no cover - older jax
        return None
    try:
        mesh = get()
    except Exception:  # pragma: no cover
        return None
    return getattr(mesh, "abstract_device", None)


def current() -> Target:
    """The target of the current trace (an abstract mesh's device wins over the default backend)."""
    dev = _abstract_device()
    if dev is not None and getattr(dev, "platform", None):
        return Target(_normalize(dev.platform), getattr(dev, "device_kind", None), True)
    backend = _normalize(jax.default_backend())
    kind = jax.devices()[0].device_kind if backend != "cpu" else None
    return Target(backend, kind, False)


def platform() -> str:
    return current().platform


def tpu_target_kind() -> str | None:
    """The ``device_kind`` of the TPU being compiled for ("TPU v5 lite", ...), or None if none is."""
    target = current()
    return target.device_kind if target.platform == "tpu" else None


# ----------------------------------------------------------------------------- interpret mode


def _mode() -> str:
    forced = getattr(_state, "mode", None)
    if forced is not None:
        return forced
    env = os.environ.get("SEQMIX_PALLAS_INTERPRET", "").strip().lower()
    if env in MODES:
        return env
    return "compiled" if platform() == "tpu" else "tpu"


def interpret_params():
    """The ``interpret=`` argument for a Pallas TPU ``pallas_call``: None (compile) for a TPU target,
    interpreter parameters otherwise (only meaningful on a CPU target; see :func:`backend_problem`)."""
    mode = _mode()
    if mode == "compiled":
        return None
    if mode == "hlo":
        return True
    params_cls = getattr(_pltpu, "InterpretParams", None)
    if params_cls is None:  # pragma: no cover - jax without the TPU interpreter
        return True
    if mode == "tpu_races":
        return params_cls(detect_races=True)
    return params_cls()


def is_interpreting() -> bool:
    return interpret_params() is not None


def gpu_interpret_params():
    """The ``interpret=`` argument for a Mosaic GPU kernel (``plgpu.kernel``): None (compile) for a GPU
    target; on any other target the Mosaic GPU interpreter (simulated GMEM/SMEM, warpgroups, barriers,
    TMA and wgmma), with its race detector in mode ``"gpu_races"``."""
    if platform() == "gpu":
        return None
    return gpu_interpreter(detect_races=_mode() == "gpu_races")


def gpu_interpreter(**kwargs):
    """``InterpretGPUParams(**kwargs)``: public as ``plgpu.InterpretGPUParams`` on jax >= 0.11, private on 0.10."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls(**kwargs)


def backend_problem(backend: str) -> str | None:
    """None if kernels of ``backend`` (``"tpu"``, ``"mosaic_gpu"``, ``"gpu"``) can run for the current
    target, else why not.

    A TPU kernel runs compiled on a TPU target and interpreted on a CPU target; a GPU target can do neither.
    A Mosaic GPU kernel runs compiled on a GPU target and in the Mosaic GPU interpreter on a CPU target.
    A ``"gpu"`` implementation (a GPU library call such as cuDNN) needs a GPU target (a GPU, or an abstract
    GPU mesh under ahead-of-time lowering).
    """
    target = current()
    if backend == "tpu":
        if target.platform in ("tpu", "cpu"):
            return None
        return (f"Pallas TPU kernels need a TPU (or interpret mode on CPU); this trace targets "
                f"{target.platform} ({target.device_kind})")
    if backend == "mosaic_gpu":
        if target.platform in ("gpu", "cpu"):
            return None
        return (f"Mosaic GPU kernels need a GPU (or the Mosaic GPU interpreter on CPU); this trace targets "
                f"{target.platform} ({target.device_kind})")
    if backend == "gpu":
        if target.platform == "gpu":
            return None
        return f"needs a GPU target; this trace targets {target.platform}" + (
            f" ({target.device_kind})" if target.device_kind else "")
    return f"unknown kernel backend {backend!r}"


@contextlib.contextmanager
def force(mode: str):
    """Run kernels in ``mode`` ("compiled", "tpu", "hlo", "tpu_races") inside the block."""
    if mode not in MODES:
        raise ValueError(f"interpret mode must be one of {MODES}; got {mode!r}")
    prev = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = prev


def races_found() -> bool:
    """Whether the TPU interpreter's race detector (mode "tpu_races") reported a race in the most
    recently interpreted kernel. Reads a private module: a test helper only."""
    import importlib

    for name in ("jax._src.pallas.mosaic.interpret.interpret_pallas_call",
                 "jax._src.pallas.mosaic.interpret"):
        try:
            races = getattr(importlib.import_module(name), "races", None)
        except ImportError:  # pragma: no cover
            continue
        if races is not None:
            return bool(getattr(races, "races_found", False))
    return False
