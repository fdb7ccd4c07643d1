"""TPU backend glue: kernel calls, tile tables and ``supports`` for ``pallas_kernels.tpu`` (DESIGN.md §2).

* :mod:`~seqmix.ops.tpu.attention`: ``attention`` -> block-sparse flash kernels;
* :mod:`~seqmix.ops.tpu.recurrent`: the gated-linear and delta-rule kernel families;
* :mod:`~seqmix.ops.tpu.tiles`: tile sizes per TPU generation.

Family op files take their ``pallas_tpu`` implementation from here; :func:`available` is the backend's
availability check (whether a kernel can run for the current trace is ``pallas_kernels._target``).
"""

from pallas_kernels.tpu import available

__all__ = ["available"]
