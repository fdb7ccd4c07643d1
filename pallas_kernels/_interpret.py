"""The one place that knows how to run a Pallas kernel in interpret mode (DESIGN.md §5).

Kernels pass ``interpret=interpret_params()`` to ``pallas_call``:

* on a TPU backend, or while lowering for a TPU ahead of time (a TPU abstract mesh is set, as in
  ``with jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`` over devices from
  ``jax.experimental.topologies``), it returns ``None``: the kernel is compiled by Mosaic;
* anywhere else (CPU tests) it returns TPU interpret-mode parameters (``pltpu.InterpretParams``,
  which simulates VMEM/SMEM, DMAs and grid order, fills uninitialized memory with NaN and raises on
  out-of-bounds reads), or ``True`` (the generic Pallas interpreter) where that class is missing.

``force(mode)`` overrides the choice inside a ``with`` block: ``"compiled"``, ``"tpu"`` (InterpretParams),
``"hlo"`` (``interpret=True``) or ``"tpu_races"`` (InterpretParams with the race detector). The
environment variable ``SEQMIX_PALLAS_INTERPRET`` sets the same modes process-wide.

Only jax is imported here: this module sits below ``seqmix`` (DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax

try:  # jax >= 0.4.3x; the location of InterpretParams moved over time, the public name did not
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - a jax without Pallas TPU
    _pltpu = None

MODES = ("compiled", "tpu", "hlo", "tpu_races")
_state = threading.local()


def _abstract_device():
    """The device of the abstract mesh being lowered for (AOT cross-compilation), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    if get is None:  # pragma: no cover - older jax
        return None
    try:
        mesh = get()
    except Exception:  # pragma: no cover
        return None
    return getattr(mesh, "abstract_device", None)


def tpu_target_kind() -> str | None:
    """The ``device_kind`` of the TPU being compiled for ("TPU v5 lite", ...), or None if none is.

    An abstract mesh over TPU devices (AOT lowering on a CPU host) wins over the default backend.
    """
    dev = _abstract_device()
    if dev is not None and getattr(dev, "platform", None) == "tpu":
        return dev.device_kind
    if jax.default_backend() == "tpu":
        return jax.devices()[0].device_kind
    return None


def _mode() -> str:
    forced = getattr(_state, "mode", None)
    if forced is not None:
        return forced
    env = os.environ.get("SEQMIX_PALLAS_INTERPRET", "").strip().lower()
    if env in MODES:
        return env
    return "compiled" if tpu_target_kind() is not None else "tpu"


def interpret_params():
    """The ``interpret=`` argument for ``pallas_call``: None (compile) on TPU, interpret params elsewhere."""
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
    recently interpreted kernel (jax resets the state per kernel; every race is also printed as
    "RACE DETECTED", which tests can capture). Reads a private module: a test helper only.
    """
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
