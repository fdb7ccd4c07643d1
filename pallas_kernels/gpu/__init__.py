"""Mosaic GPU kernels (Hopper, sm_90a): room for the GPU backend (DESIGN.md §2, docs/GPU.md).

No kernel lives here yet. :func:`available` is the backend's availability check, as for TPU.
"""


def available() -> str | None:
    """None if Pallas Mosaic GPU is importable in this jax, else why not."""
    try:
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a missing optional dependency (absl)
        return f"jax.experimental.pallas.mosaic_gpu is not importable: {type(err).__name__}: {err}"
    return None
