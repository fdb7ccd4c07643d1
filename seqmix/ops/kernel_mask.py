"""Whether a mask's predicate can run inside a kernel (Pallas TPU and Mosaic GPU alike).

The block-sparse kernels evaluate ``mask.allowed`` on int32 coordinate tiles of PARTIAL blocks. That
works when the predicate is elementwise integer arithmetic, comparisons and selects; a mask that
gathers from a host matrix (``Explicit``) or uses another primitive cannot, and :func:`predicate_problem`
says why so that ``supports`` refuses the call and dispatch falls back to XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import masks as masks_lib

# Primitives an int32 predicate may use in-kernel (elementwise arithmetic, comparisons, selects).
_SAFE_PRIMITIVES = frozenset({
    "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "xor", "add", "sub", "mul", "div", "rem",
    "neg", "sign", "abs", "max", "min", "select_n", "broadcast_in_dim", "convert_element_type",
    "floor", "ceil", "clamp", "shift_left", "shift_right_arithmetic", "shift_right_logical",
    "reshape", "squeeze", "expand_dims", "integer_pow", "copy", "copy_p", "iota", "pjit", "jit",
    "closed_call", "core_call",
})


def _sub_jaxprs(eqn):
    for val in eqn.params.values():
        for v in (val if isinstance(val, (tuple, list)) else (val,)):
            if hasattr(v, "eqns"):
                yield v, ()
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr, tuple(getattr(v, "consts", ()))


def _jaxpr_problem(jaxpr, consts) -> str | None:
    if any(np.size(c) > 1 for c in consts):
        return "captures an array constant (a TPU kernel cannot gather from a host matrix)"
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in _SAFE_PRIMITIVES:
            return f"uses `{name}`, which the kernel does not evaluate in-kernel"
        for sub, sub_consts in _sub_jaxprs(eqn):
            problem = _jaxpr_problem(sub, sub_consts)
            if problem:
                return problem
    return None


def _predicate_problem_uncached(mask: masks_lib.Mask) -> str | None:
    i32 = jnp.int32
    args = (jax.ShapeDtypeStruct((8, 1), i32), jax.ShapeDtypeStruct((8, 1), i32),
            jax.ShapeDtypeStruct((1, 128), i32), jax.ShapeDtypeStruct((1, 128), i32))
    try:
        closed = jax.make_jaxpr(lambda qp, qr, kp, kr: mask.allowed(masks_lib.Coords(qp, qr),
                                                                    masks_lib.Coords(kp, kr)))(*args)
    except Exception as err:  # noqa: BLE001 - any failure means "not kernel-evaluable"
        return f"mask {type(mask).__name__} cannot be traced on int32 coordinate tiles ({type(err).__name__})"
    out = closed.out_avals[0]
    if out.dtype != jnp.bool_:
        return f"mask {type(mask).__name__}.allowed returns {out.dtype}, expected bool"
    problem = _jaxpr_problem(closed.jaxpr, closed.consts)
    if problem:
        return (f"mask {type(mask).__name__} {problem}; block-sparse Explicit masks need "
                "precomputed mask tiles, which this kernel does not take yet")
    return None


@functools.lru_cache(maxsize=256)
def _predicate_problem_cached(mask) -> str | None:
    return _predicate_problem_uncached(mask)


def predicate_problem(mask: masks_lib.Mask) -> str | None:
    """None if ``mask.allowed`` can run inside a Mosaic kernel, else why not."""
    try:
        return _predicate_problem_cached(mask)
    except TypeError:  # an unhashable user mask
        return _predicate_problem_uncached(mask)
