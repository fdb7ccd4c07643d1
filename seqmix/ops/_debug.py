"""The debug switch: runtime value checks inside every op, also under ``jit`` (chex ``chexify``).

Argument errors that depend only on shapes and dtypes are always ``ValueError``s at the op boundary.
Checks on *values* cost a device sync, so they are off by default and cover concrete inputs only
(e.g. a positive log gate is rejected when ``g`` is a numpy array). Turn them on to check traced values
as well::

    import chex, seqmix
    with seqmix.ops.debug_checks():                       # or SEQMIX_DEBUG_CHECKS=1 in the environment
        loss = chex.chexify(jax.jit(loss_fn), async_check=False)(params, batch)

Inside the block every op asserts, on the values it receives: finite q, k, v (and finite state and
per-token arrays), log gates ``<= 0`` (``-inf`` allowed: a hard reset) and β inside its family's bounds.
A failure names the op and the argument: ``AssertionError`` for non-finite values (chex's
``assert_tree_all_finite``), ``jax.experimental.checkify.JaxRuntimeError`` for a range (``checkify.check``). Under ``jit`` the assertions need the
``chex.chexify`` wrapper (chex says so if it is missing); outside ``jit`` they raise at once.
"""

from __future__ import annotations

import contextlib
import os
import threading

import chex
import jax.numpy as jnp
from jax.experimental import checkify

_state = threading.local()


def enabled() -> bool:
    flag = getattr(_state, "on", None)
    if flag is not None:
        return flag
    return os.environ.get("SEQMIX_DEBUG_CHECKS", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def debug_checks(on: bool = True):
    """Enable (or, with ``on=False``, disable) the ops' runtime value checks inside the block."""
    prev = getattr(_state, "on", None)
    _state.on = bool(on)
    try:
        yield
    finally:
        _state.on = prev


def check_call(fam, call) -> None:
    """The family's value assertions on a prepared call (no-op unless :func:`enabled`)."""
    if not enabled():
        return
    name = fam.name
    for arg in ("q", "k", "v", "initial_state", "beta"):
        x = getattr(call, arg, None)
        if x is not None:
            chex.assert_tree_all_finite(x, custom_message=f"{name}: {arg} must be finite")
    g = getattr(call, "g", None)
    if g is not None:
        checkify.check(jnp.all(g <= 0) & ~jnp.any(jnp.isnan(g)), f"{name}: g is a log decay and must be <= 0 (no NaN)")
    beta = getattr(call, "beta", None)
    if beta is not None:
        lo, hi = _bounds(fam, "beta")
        checkify.check(jnp.all((beta >= lo) & (beta <= hi)), f"{name}: beta must lie in [{lo}, {hi}]")


def _bounds(fam, arg: str) -> tuple[float, float]:
    try:
        bounds = fam.arg(arg).bounds
    except KeyError:
        bounds = None
    return bounds or (-float("inf"), float("inf"))
