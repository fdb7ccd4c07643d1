"""Long inputs of a chunked recurrent form, one group of chunks at a time (the gated-linear and delta forms).

A chunked form computes several ``[T, D]``-sized intermediates (decay factors, weighted keys, scores, their
cotangents) over the whole sequence at once, and XLA:CPU writes each out and reads it back. Beyond a few
thousand tokens × rows they no longer fit in the cache, and the form becomes bound by memory traffic. Run
group by group instead, with the state carried from one group to the next. This is exact: it is the chained
form of FAMILIES.md §2.4, and each group is a call with an initial state. The backward runs the groups in
reverse. Each group's final-state cotangent is the next group's initial-state gradient.

The residuals are the inputs plus the state entering each group (``[groups, B, H, Dk, Dv]``), plus whatever
per-group residuals the form keeps. Padding is zeros (k = v = 0, g = 0, β = 0, no reset), so padded tokens
leave the state unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import _target

Array = Any


#: Fewer groups than this run as one. Two groups were no faster than one (interleaved, fwd+bwd as value and
#: gradient, B·H = 4; ms one group / two): gla T = 1k 10.7 / 12.9, simple_gla 2k 18.2 / 19.1, gated delta
#: rule 2k 55.1 / 52.1; four and more were (gla 2k 30.8 / 19.2 with four, simple_gla 4k 54.0 / 33.5).
MIN_GROUPS = 3


def plan(length: int, chunk: int, rows: int, row_tokens: int) -> tuple[int, int]:
    """``(tokens per group, groups)``: on CPU about ``row_tokens / rows`` tokens per group (at least one
    chunk), balanced so that padding the last group costs less than one chunk per group, and one group where
    that would make fewer than :data:`MIN_GROUPS`. Other platforms get one group: there the ``xla`` form is
    the fallback, and a sequential loop over groups is unmeasured."""
    n = -(-length // chunk)
    if _target.platform() != "cpu":
        return chunk * n, 1
    groups = -(-n // max(1, row_tokens // (rows * chunk)))
    if groups < MIN_GROUPS:
        return chunk * n, 1
    return chunk * -(-n // groups), groups


def _slicer(arrays, group: int, groups: int):
    """``i -> arrays of group i`` (``[B, group, ...]``; None stays None), the token axis zero-padded first."""
    padded = [None if a is None else
              jnp.pad(a, [(0, 0), (0, groups * group - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    return lambda i: [None if a is None else jax.lax.dynamic_slice_in_dim(a, i * group, group, axis=1)
                      for a in padded]


def _ungroup(x, length: int):
    """``[groups, B, group, ...]`` -> ``[B, length, ...]``."""
    return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])[:, :length]


def forward(step: Callable, arrays, state0, group: int, groups: int):
    """Run ``step(arrays of one group, state) -> (out [B, group, ...], end state, residuals)`` over the
    groups in order. Returns (out ``[B, T, ...]``, final state, what :func:`backward` needs: the states
    entering each group, the final state and the residuals stacked over groups)."""
    take = _slicer(arrays, group, groups)

    def body(state, i):
        out, end, res = step(take(i), state)
        return end, (out, state, res)

    final, (out, starts, res) = jax.lax.scan(body, state0, jnp.arange(groups))
    return _ungroup(out, arrays[0].shape[1]), final, (starts, final, res)


def backward(step: Callable, arrays, d_out, saved, d_final, group: int, groups: int):
    """The reverse of :func:`forward`: ``step(arrays of one group, d_out of it, start state, end state,
    its residuals, end-state cotangent) -> (cotangents of the group's arrays, start-state cotangent)``.
    ``saved`` is what :func:`forward` returned third. Returns (cotangents ``[B, T, ...]`` of ``arrays``,
    None where the step gives None; cotangent of the initial state)."""
    starts, final, res = saved
    take = _slicer(list(arrays) + [d_out], group, groups)
    ends = jnp.concatenate([starts[1:], final[None]], axis=0)

    def body(d_end, i):
        *xs, dout = take(i)
        res_i = jax.tree_util.tree_map(lambda r: r[i], res)
        d_xs, d_start = step(xs, dout, starts[i], ends[i], res_i, d_end)
        return d_start, d_xs

    d_start, d_xs = jax.lax.scan(body, d_final, jnp.arange(groups), reverse=True)
    length = arrays[0].shape[1]
    return [None if d is None else _ungroup(d, length) for d in d_xs], d_start
