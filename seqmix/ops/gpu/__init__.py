"""GPU backend glue (room for it): the Mosaic GPU kernels of ``pallas_kernels.gpu`` and cuDNN will be
lowered here, as ``seqmix.ops.tpu`` does for TPU. No GPU implementation is registered yet."""

from pallas_kernels.gpu import available

__all__ = ["available"]
