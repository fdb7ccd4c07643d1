"""Mosaic TPU kernels (Pallas): raw kernels and their ``custom_vjp``, nothing from ``seqmix``.

:func:`available` says whether this jax can build them at all (``jax.experimental.pallas.tpu``
importable); whether they can *run* for the current trace is ``pallas_kernels._target.backend_problem``.
"""


def available() -> str | None:
    """None if Pallas TPU is importable in this jax, else why not."""
    try:
        from jax.experimental.pallas import tpu  # noqa: F401
    except ImportError as err:  # pragma: no cover - a jax without Pallas TPU
        return f"jax.experimental.pallas.tpu is not importable: {err}"
    return None
