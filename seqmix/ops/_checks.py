"""Argument checks shared by the ops: clear ValueErrors that name the argument, what came and what was expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dtype_of(x):
    """The dtype of an array, a ShapeDtypeStruct (for ahead-of-time lowering) or a Python value."""
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def shape_str(x) -> str:
    return f"{dtype_of(x)}{list(jnp.shape(x))}" if x is not None else "None"


def require_rank(name: str, x, rank: int, layout: str) -> None:
    if x is None or jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}); got {shape_str(x)}")


def require_float(name: str, x) -> None:
    if not jnp.issubdtype(dtype_of(x), jnp.floating):
        raise ValueError(f"{name} must be a floating array; got {shape_str(x)}")


def require_shape(name: str, x, expected: tuple, layout: str) -> None:
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)} ({layout}); got {shape_str(x)}")


def require_int_array(name: str, x, expected: tuple, layout: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array ({layout}); got {shape_str(x)}")
    require_shape(name, x, expected, layout)
    return x.astype(jnp.int32)


def require_positive(name: str, x, allow_none: bool = True):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not x > 0:
        raise ValueError(f"{name} must be a positive number{' or None' if allow_none else ''}; got {x!r}")
    return float(x)


def require_same_dtype(**arrays) -> None:
    dtypes = {n: dtype_of(a) for n, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise ValueError(f"inputs must share one dtype; got {listing}")


def is_concrete(x) -> bool:
    """True for values known now (numpy or committed jax arrays), False for tracers under jit/grad."""
    return not isinstance(x, jax.core.Tracer)
