"""Mosaic GPU kernels (Hopper, sm_90a) and the H100 target description for ahead-of-time compiles
(DESIGN.md §2, docs/GPU.md): ``flash_attention`` (block-sparse flash attention, forward / dq / dkv),
``gated_linear`` (the chunked gated-linear recurrence), ``delta_wy`` and ``delta_rule`` (the delta rule's
chunk-parallel WY part and its state pass) and
``aot`` (compiles for an H100 on a CPU host with ptxas).

:func:`available` is the backend's availability check, as for TPU.
"""


def available() -> str | None:
    """None if Pallas Mosaic GPU is importable in this jax, else why not."""
    try:
        from jax.experimental.pallas import mosaic_gpu  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a missing optional dependency (absl)
        return f"jax.experimental.pallas.mosaic_gpu is not importable: {type(err).__name__}: {err}"
    return None
