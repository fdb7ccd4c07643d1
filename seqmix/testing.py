"""Numerics helpers for comparing an implementation with its reference (FAMILIES.md §5.3).

A tensor passes iff it is finite and both

* ``rms  = ||x - r||_2 / (||r||_2 + 1e-8) <= tau_rms``  (or ``max|x - r| <= 1e-6``), and
* ``rmax = max|x - r| / max(max|r|, 1e-6) <= tau_max``   (catches a single bad tile).

Both sides are cast to fp32. Tolerances come from :data:`TOLERANCES`, keyed by the comparison kind
and the tensor's role (``"out"`` for o / final_state / lse, ``"grad"`` for dq dk dv dh0, ``"gate"``
for gate, beta and sink-logit gradients). Useful to anyone testing their own kernel.

The tree assertion runs on chex (``chex.assert_trees_all_equal_comparator`` with the seqmix comparator),
so structure mismatches and every failing leaf are reported the chex way; :func:`assert_finite` and
:func:`assert_shape` are chex's ``assert_tree_all_finite`` / ``assert_shape``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

# (tau_rms, tau_max) per comparison kind and role. Tighten per kernel when it does better; never loosen.
TOLERANCES = {
    "fp32": {"out": (1e-5, 1e-4), "grad": (1e-4, 1e-3), "gate": (1e-4, 1e-3)},
    "softmax_bf16": {"out": (5e-3, 2e-2), "grad": (1e-2, 5e-2), "gate": (2e-2, 1e-1)},
    "recurrent_bf16": {"out": (5e-3, 2e-2), "grad": (8e-3, 5e-2), "gate": (2e-2, 1e-1)},
    "sharded": {"out": (1e-5, 1e-4), "grad": (1e-4, 1e-3), "gate": (1e-4, 1e-3)},
}


def errors(x, ref) -> tuple[float, float, float]:
    """(rms, rmax, max abs) relative errors of ``x`` against ``ref`` (fp32, infinities compared as equal)."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    same_inf = np.isinf(x) & np.isinf(r) & (np.sign(x) == np.sign(r))
    x, r = np.where(same_inf, 0.0, x), np.where(same_inf, 0.0, r)
    diff = x - r
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    rms = float(np.linalg.norm(diff) / (np.linalg.norm(r) + 1e-8))
    rmax = max_abs / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-6)
    return rms, rmax, max_abs


def check_close(x, ref, *, kind: str = "fp32", role: str = "out", name: str = "x") -> str | None:
    """None if ``x`` passes against ``ref``; otherwise a message with the measured errors."""
    tau_rms, tau_max = TOLERANCES[kind][role]
    if jnp.shape(x) != jnp.shape(ref):
        return f"{name}: shape {jnp.shape(x)} != reference {jnp.shape(ref)}"
    xf = np.asarray(jnp.asarray(x, jnp.float32))
    rf = np.asarray(jnp.asarray(ref, jnp.float32))
    bad = ~np.isfinite(xf) & ~(np.isinf(xf) & np.isinf(rf) & (np.sign(xf) == np.sign(rf)))
    if bad.any():
        return f"{name}: {int(bad.sum())} non-finite values (first at {np.argwhere(bad)[0].tolist()})"
    rms, rmax, max_abs = errors(x, ref)
    if (rms <= tau_rms or max_abs <= 1e-6) and rmax <= tau_max:
        return None
    return (f"{name}: rms {rms:.3g} (tol {tau_rms:g}), rmax {rmax:.3g} (tol {tau_max:g}), "
            f"max abs {max_abs:.3g} [{kind}/{role}]")


def assert_close(x, ref, *, kind: str = "fp32", role: str = "out", name: str = "x") -> None:
    """Raise AssertionError unless ``x`` matches ``ref`` within the seqmix tolerance for kind/role."""
    msg = check_close(x, ref, kind=kind, role=role, name=name)
    if msg is not None:
        raise AssertionError(msg)


def assert_trees_close(xs, refs, *, kind: str = "fp32", role: str = "out", name: str = "tree") -> None:
    """:func:`assert_close` over matching leaves of two pytrees of one structure (chex comparator).

    ``role`` is one role for every leaf, or a pytree prefix of roles (e.g. ``{"o": "out", "dg": "gate"}``
    for dict trees).
    """
    if isinstance(role, str):
        chex.assert_trees_all_equal_comparator(
            lambda a, b: check_close(a, b, kind=kind, role=role, name=name) is None,
            lambda a, b: check_close(a, b, kind=kind, role=role, name=name), xs, refs)
        return
    chex.assert_trees_all_equal_structs(xs, refs)
    for key in role:
        assert_trees_close(xs[key], refs[key], kind=kind, role=role[key], name=f"{name}[{key!r}]")


def assert_finite(tree, name: str = "tree") -> None:
    """Every leaf is finite (``chex.assert_tree_all_finite``)."""
    chex.assert_tree_all_finite(tree, custom_message=name)


def assert_shape(x, shape) -> None:
    """``chex.assert_shape`` (``None`` entries match any size)."""
    chex.assert_shape(x, shape)


def assert_not_close(x, ref, *, min_rms: float = 1e-3, name: str = "x") -> None:
    """Assert a feature had an effect: ``x`` differs from ``ref`` by at least ``min_rms`` relative rms."""
    rms, _, _ = errors(x, ref)
    if rms < min_rms:
        raise AssertionError(f"{name}: expected a change (rms >= {min_rms:g}), got rms {rms:.3g}")


def tolerance_kind(dtype, family_kind: str = "softmax") -> str:
    """The TOLERANCES key for inputs of ``dtype``: "fp32" or "<family_kind>_bf16"."""
    return "fp32" if jnp.dtype(dtype) == jnp.float32 else f"{family_kind}_bf16"


def packed_segments(b: int, t: int, lengths):
    """int32 ``[b, t]`` segment ids packing documents of the given lengths (the last id absorbs the
    remainder): the ``segment_ids`` argument of every op, for tests and benchmarks."""
    ids = np.zeros((b, t), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        ids[:, start:start + n] = i
        start += n
    ids[:, start:] = len(lengths)
    return jnp.asarray(ids)
