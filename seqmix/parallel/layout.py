"""Causal load balancing as a one-time permutation of the sequence (FAMILIES.md §4.2).

Contiguous sharding makes causal rings unbalanced: device 0 skips most steps, device P−1 computes them
all. Permute the sequence once in the input pipeline (tokens, targets, positions, segment ids, loss
masks), shard the permuted arrays contiguously, and give every op the permuted **global positions**:
masks are predicates on positions, so nothing else changes. Undo it on the outputs with the inverse.

A permutation here is an int array ``perm`` of length ``n`` with ``permuted[i] = x[perm[i]]``; so
``perm`` itself is the global position of each permuted token.

* ``zigzag`` (dual-chunk swap): ``2P`` chunks; device ``i`` holds chunks ``i`` and ``2P−1−i``
  (``n % 2P == 0``). P = 2, n = 8: ``[0, 1, 6, 7, 2, 3, 4, 5]``.
* ``striped``: token ``t`` on device ``t mod P`` (``n % P == 0``). P = 2, n = 8: ``[0, 2, 4, 6, 1, 3, 5, 7]``.

Segment-relative positions (``rel``, used by sink and prefix-LM masks) must be computed on the
*unpermuted* sequence and then permuted like everything else: :func:`permute_inputs` does that.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from seqmix.ops import masks as masks_lib

LAYOUTS = (None, "contiguous", "zigzag", "striped")


def _check(n, num_shards, multiple_of, scheme):
    for name, val in (("n", n), ("num_shards", num_shards)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{scheme}: {name} must be a positive int; got {val!r}")
    if n % multiple_of:
        raise ValueError(f"{scheme} layout over {num_shards} shards needs a sequence length divisible by "
                         f"{multiple_of}; got n={n} (pad the sequence to a multiple of {multiple_of})")


def zigzag_permutation(n: int, num_shards: int) -> np.ndarray:
    """int32 ``[n]``: device ``i`` holds chunks ``i`` and ``2P − 1 − i`` of length ``n / 2P`` (P = num_shards)."""
    _check(n, num_shards, 2 * num_shards, "zigzag")
    c = n // (2 * num_shards)
    chunks = np.arange(n, dtype=np.int32).reshape(2 * num_shards, c)
    order = [j for i in range(num_shards) for j in (i, 2 * num_shards - 1 - i)]
    return chunks[order].reshape(n)


def striped_permutation(n: int, num_shards: int) -> np.ndarray:
    """int32 ``[n]``: token ``t`` goes to device ``t mod num_shards`` (in increasing t on each device)."""
    _check(n, num_shards, num_shards, "striped")
    return np.arange(n, dtype=np.int32).reshape(n // num_shards, num_shards).T.reshape(n)


def contiguous_permutation(n: int, num_shards: int) -> np.ndarray:
    """The identity (contiguous sharding), ``n % num_shards == 0``."""
    _check(n, num_shards, num_shards, "contiguous")
    return np.arange(n, dtype=np.int32)


def permutation(layout: str | None, n: int, num_shards: int) -> np.ndarray:
    """The permutation of ``layout`` in :data:`LAYOUTS` (None and ``"contiguous"``: the identity)."""
    if layout is None or layout == "contiguous":
        return contiguous_permutation(n, num_shards)
    if layout == "zigzag":
        return zigzag_permutation(n, num_shards)
    if layout == "striped":
        return striped_permutation(n, num_shards)
    raise ValueError(f"layout must be one of {list(LAYOUTS)}; got {layout!r}")


def inverse_permutation(perm) -> np.ndarray:
    """``inv`` with ``inv[perm[i]] = i`` (so ``permute(permute(x, perm), inv) == x``)."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or sorted(perm.tolist()) != list(range(perm.shape[0])):
        raise ValueError(f"perm must be a permutation of range(n) (1-D); got shape {list(perm.shape)}")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def permute(x, perm, axis: int = 1):
    """``x`` reordered along ``axis`` (default 1, the sequence axis of ``[B, T, ...]``): ``out[i] = x[perm[i]]``."""
    perm = np.asarray(perm)
    if jnp.shape(x)[axis] != perm.shape[0]:
        raise ValueError(f"axis {axis} of x has length {jnp.shape(x)[axis]}, the permutation has {perm.shape[0]}")
    return jnp.take(jnp.asarray(x), jnp.asarray(perm), axis=axis)


def unpermute(x, perm, axis: int = 1):
    """The inverse of :func:`permute`: ``unpermute(permute(x, perm), perm) == x``."""
    return permute(x, inverse_permutation(perm), axis=axis)


def permute_tree(tree, perm, axis: int = 1):
    """:func:`permute` on every array leaf of a pytree (None leaves stay None)."""
    import jax

    return jax.tree_util.tree_map(lambda x: permute(x, perm, axis), tree)


def unpermute_tree(tree, perm, axis: int = 1):
    import jax

    return jax.tree_util.tree_map(lambda x: unpermute(x, perm, axis), tree)


def permute_inputs(perm, *, segment_ids=None, positions=None, **arrays: Any) -> dict:
    """Everything an SP layer needs from one permutation, on global ``[B, N, ...]`` arrays.

    Returns a dict with ``positions`` (int32 ``[N]``: the permuted global positions, i.e. ``perm`` or
    ``positions[perm]``), ``segment_ids`` (``[B, N]`` permuted, or None), ``relative_positions``
    (int32 ``[B or 1, N]``: segment-relative positions computed on the unpermuted sequence, then
    permuted) and every extra keyword array (tokens, targets, loss masks, q/k/v, ...) permuted along
    axis 1.
    """
    perm = np.asarray(perm)
    n = perm.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32) if positions is None else jnp.asarray(positions, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    rel = masks_lib.segment_relative(pos, seg)
    out = {"positions": permute(pos, perm, axis=0), "segment_ids": None if seg is None else permute(seg, perm),
           "relative_positions": permute(rel, perm)}
    for name, x in arrays.items():
        out[name] = None if x is None else permute(x, perm)
    return out
