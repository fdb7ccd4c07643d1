"""Pallas TPU API drift guards shared by every TPU kernel (jax 0.10 – 0.12).

* ``CompilerParams``: ``pltpu.CompilerParams`` (``TPUCompilerParams`` before jax 0.7);
* ``SQ``: ``pl.Squeezed()`` as a BlockSpec dimension (``None`` before it existed);
* :func:`vmem`: a VMEM scratch shape (``pltpu.VMEM``; ``pltpu.MemorySpace.VMEM`` on very old jax).
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
SQ = pl.Squeezed() if hasattr(pl, "Squeezed") else None
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec


def vmem(shape, dtype):
    space = getattr(pltpu, "VMEM", None)
    if space is None:  # pragma: no cover - very old jax
        space = pltpu.MemorySpace.VMEM
    return space(shape, dtype)
