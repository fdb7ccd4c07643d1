"""What the conformance suite runs, generated from the family records (and nothing else).

Every implementation except the reference is exercised in each mode its ``evidence`` names, so the
capability matrix (``seqmix.ops.capability_markdown``: the same evidence labels) equals what this suite
covers. A mode this machine cannot run (a GPU mode on a CPU-only host) would fail the plan check rather
than be skipped silently: only the modes in :data:`RUNNERS` exist today.
"""

from __future__ import annotations

import contextlib

from pallas_kernels import _target
from seqmix.ops import _registry

NUMERIC_MODES = ("cpu", "tpu:interpret", "gpu:interpret")  # run against the reference here
# ahead-of-time compiles at production shapes (tests/conformance/test_tpu_compile.py, test_gpu_compile.py)
COMPILE_MODES = ("tpu:aot", "gpu:aot")
RUNNERS = NUMERIC_MODES + COMPILE_MODES


@contextlib.contextmanager
def mode_context(mode: str):
    """Run a numeric mode: natively (``cpu``), in the Pallas TPU interpreter (``tpu:interpret``) or in the
    Mosaic GPU interpreter (``gpu:interpret``: a CPU trace runs Mosaic GPU kernels there by itself)."""
    if mode in ("cpu", "gpu:interpret"):
        yield
    elif mode == "tpu:interpret":
        with _target.force("tpu"):
            yield
    else:
        raise ValueError(f"no numeric runner for mode {mode!r}")


def head_dim(mode: str) -> int:
    """Head dims of a mode's conformance inputs: 16, or 64 in the Mosaic GPU interpreter (the kernels'
    ``wgmma`` tiles take multiples of 64)."""
    return 64 if mode == "gpu:interpret" else 16


def cells(kind: str | None = None, modes=NUMERIC_MODES, family_filter=None):
    """``[(family, impl, mode)]`` for every registered implementation (not the reference) and every
    evidence mode of it in ``modes``, for families of ``kind`` (None: all)."""
    out = []
    for name in sorted(_registry.FAMILIES):
        fam = _registry.FAMILIES[name]
        if kind is not None and fam.kind != kind:
            continue
        if family_filter is not None and not family_filter(fam):
            continue
        for impl in fam.implementations.values():
            if impl.name == "reference":
                continue
            out.extend((name, impl.name, m) for m in impl.evidence if m in modes)
    return out


def cell_id(cell) -> str:
    return "-".join(cell)
