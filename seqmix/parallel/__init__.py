"""Sequence parallelism: shard_map strategies over one mesh axis (DESIGN.md §6, FAMILIES.md §4).

Strategies take **local shards** inside ``jax.shard_map`` and the sequence axis name; positions are
the shard's global positions, so load-balancing permutations need nothing else:

| strategy | families | collectives per layer (forward) | module |
|---|---|---|---|
| :func:`ring_attention` | ``attention`` | P − 1 ``ppermute`` of k, v (+ positions, segment ids) | :mod:`~seqmix.parallel.ring` |
| :func:`ulysses_attention` | ``attention`` (heads divisible by P) | 4 ``all_to_all`` (q, k, v, o) | :mod:`~seqmix.parallel.ulysses` |
| :func:`allgather_attention` | ``attention`` | one ``all_gather`` of k‖v (+ one of int metadata) | :mod:`~seqmix.parallel.allgather` |
| :func:`lasp2` | recurrent families | one ``all_gather`` of the shard summaries | :mod:`~seqmix.parallel.lasp` |
| :func:`lasp1` | recurrent families | P − 1 serial ``ppermute`` hops of one state | :mod:`~seqmix.parallel.lasp` |

**LASP-2H** (hybrid models, FAMILIES.md §4.8): softmax layers use all-gather KV and recurrent layers
use LASP-2, so every layer of a hybrid issues one all-gather, all layers share one sharding of the
sequence, and the load-balancing permutation (if any) is applied once to the inputs, for all layers.
:func:`lasp2h` returns the strategy for a family. A layout permutation only suits the softmax layers
(a recurrence needs the tokens in order), so LASP-2H hybrids use the contiguous layout.

Load balancing (:mod:`~seqmix.parallel.layout`): ``zigzag`` and ``striped`` permutations with inverses
for tokens, positions, segment ids and targets. Meshes (:mod:`~seqmix.parallel.mesh`): axes
``("data", "fsdp", "seq", "tensor")``.

For users and tests, :func:`sequence_parallel_attention` and :func:`sequence_parallel_recurrent` take
global arrays, apply the layout permutation, run the strategy under ``jax.shard_map`` (batch over the
mesh's data/fsdp axes) and undo the permutation.

JAX note: the single-device ops are not typed for ``shard_map``'s varying-value checks, so strategies
run under ``jax.shard_map(..., check_vma=False)``.

Import order: this package registers its strategies in the capability matrix for the families
registered when it is imported (``seqmix.ops`` and the recurrent op modules first).
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from seqmix.ops import _registry
from seqmix.ops import masks as masks_lib
from seqmix.parallel import layout, mesh
from seqmix.parallel import layout as layout_lib
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel._common import mask_uses_rel
from seqmix.parallel.allgather import allgather_attention
from seqmix.parallel.lasp import lasp1, lasp2
from seqmix.parallel.layout import (inverse_permutation, permute, permute_inputs, striped_permutation,
                                    unpermute, zigzag_permutation)
from seqmix.parallel.mesh import AXES, make_mesh
from seqmix.parallel.ring import ring_attention
from seqmix.parallel.ulysses import ulysses_attention

SOFTMAX_STRATEGIES: dict[str, Callable] = {
    "ring": ring_attention,
    "ulysses": ulysses_attention,
    "allgather": allgather_attention,
}
RECURRENT_STRATEGIES: dict[str, Callable] = {"lasp2": lasp2, "lasp1": lasp1}

# Make sure the recurrent families shipped with seqmix are registered before we fill the matrix.
for _mod in ("linear_attention", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule"):
    try:
        importlib.import_module(f"seqmix.ops.{_mod}")
    except ImportError:  # a family not present in this build
        pass


def _register() -> None:
    for name, fn in SOFTMAX_STRATEGIES.items():
        _registry.register_parallel("attention", name, fn)
    from seqmix.parallel import lasp as _lasp

    _lasp.register_families()


_register()


def lasp2h(family: str) -> Callable:
    """The LASP-2H strategy for a layer of ``family``: all-gather KV for ``attention``, LASP-2 otherwise.

    The returned function takes local shards and ``axis_name`` like the strategy it names; for a
    recurrent family it is ``lasp2`` with the family bound.
    """
    if family == "attention":
        return allgather_attention
    fam = _registry.get_family(family)
    if "lasp2" not in fam.parallel:
        raise ValueError(f"family {family!r} has no LASP-2 strategy; families with one: "
                         f"{sorted(n for n, f in _registry.FAMILIES.items() if 'lasp2' in f.parallel)}")
    return fam.parallel["lasp2"]


# ----------------------------------------------------------------------------- global-array wrappers


def _batch_axes(m, axis, batch_axes, b):
    if batch_axes == "auto":
        axes = tuple(a for a in m.axis_names if a != axis and a in mesh_lib.BATCH_AXES and m.shape[a] > 1)
    else:
        axes = tuple(batch_axes or ())
    for a in axes:
        if a not in m.axis_names or a == axis:
            raise ValueError(f"batch axis {a!r} must be a mesh axis other than the sequence axis {axis!r}; "
                             f"mesh axes: {list(m.axis_names)}")
    size = 1
    for a in axes:
        size *= m.shape[a]
    if b % size:
        raise ValueError(f"batch {b} must be divisible by the batch mesh axes {axes} (size {size})")
    return axes or None


def _seq_len_check(n, p, axis, what):
    if n % p:
        raise ValueError(f"{what}: sequence length {n} must be divisible by the '{axis}' axis size {p}")


def sequence_parallel_attention(q, k, v, *, mesh, axis: str = "seq", strategy: str = "ring", layout=None,
                                mask=None, segment_ids=None, sink_logits=None, soft_cap=None, scale=None,
                                impl=None, return_lse=False, batch_axes="auto", **strategy_kwargs):
    """:func:`seqmix.ops.attention` on global arrays, sequence-parallel over ``mesh`` axis ``axis``.

    q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, ·]``, segment_ids ``[B, T]`` (self-attention) or None;
    ``strategy`` in ``"ring" | "ulysses" | "allgather"``; ``layout`` in ``None | "zigzag" | "striped"``
    (a one-time permutation, undone on the outputs; needs T == S). Positions are the op's defaults
    (``arange``; bottom-right aligned queries when T < S). The batch is sharded over ``batch_axes``
    (default: the mesh's data/fsdp axes of size > 1). Returns what the op returns, in the original order.
    """
    if strategy not in SOFTMAX_STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(SOFTMAX_STRATEGIES)}; got {strategy!r}")
    fn = SOFTMAX_STRATEGIES[strategy]
    mask = masks_lib.Full() if mask is None else mask
    b, t = q.shape[:2]
    s = k.shape[1]
    p = mesh_lib.axis_size(mesh, axis)
    _seq_len_check(t, p, axis, "q")
    _seq_len_check(s, p, axis, "k/v")
    if layout is not None and t != s:
        raise ValueError(f"layout={layout!r} needs q and k of one length (self-attention); got T={t}, S={s}")
    if segment_ids is not None and t != s:
        raise ValueError("segment_ids [B, T] needs T == S; cross-attention with segments is not supported here")
    perm = layout_lib.permutation(layout, t, p)
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t)
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    rel = None
    if seg is not None and mask_uses_rel(mask):
        rel = masks_lib.segment_relative(kv_pos, seg)  # global, before the permutation
    if layout is not None:
        q, k, v = (permute(x, perm) for x in (q, k, v))
        q_pos = kv_pos = jnp.asarray(perm)
        seg = None if seg is None else permute(seg, perm)
        rel = None if rel is None else permute(rel, perm)
    bax = _batch_axes(mesh, axis, batch_axes, b)
    x_spec = PS(bax, axis)
    args = {"q": q, "k": k, "v": v, "q_positions": q_pos, "kv_positions": kv_pos}
    specs = {"q": x_spec, "k": x_spec, "v": x_spec, "q_positions": PS(axis), "kv_positions": PS(axis)}
    if seg is not None:
        args["segment_ids"], specs["segment_ids"] = seg, x_spec
    if rel is not None:
        args["relative_positions"], specs["relative_positions"] = (rel, rel), (x_spec, x_spec)
    if sink_logits is not None:
        args["sink_logits"], specs["sink_logits"] = sink_logits, PS()

    if t == s:  # self-attention: one position array serves q and kv
        del args["kv_positions"], specs["kv_positions"]

    def local(kw):
        if "kv_positions" not in kw:
            kw["kv_positions"] = kw["q_positions"]
        return fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), axis_name=axis, mask=mask, soft_cap=soft_cap,
                  scale=scale, impl=impl, return_lse=return_lse, **kw, **strategy_kwargs)

    out_specs = (x_spec, PS(bax, None, axis)) if return_lse else x_spec
    out = jax.shard_map(lambda kw: local(dict(kw)), mesh=mesh, in_specs=(specs,), out_specs=out_specs,
                        check_vma=False)(args)
    if layout is None:
        return out
    if return_lse:
        return unpermute(out[0], perm), unpermute(out[1], perm, axis=2)
    return unpermute(out, perm)


def sequence_parallel_recurrent(family: str, q, k, v, *args, mesh, axis: str = "seq", strategy: str = "lasp2",
                                segment_ids=None, initial_state=None, return_state=False, impl=None,
                                batch_axes="auto", **kwargs):
    """A recurrent family's op on global arrays, sequence-parallel (LASP-1 / LASP-2) over ``mesh`` axis ``axis``.

    ``args`` are the op's positional arguments after (q, k, v) (``g``, ``beta``): ``[B, T, ...]`` arrays
    are sharded along the sequence, a per-head ``g [H]`` is replicated; keyword arguments (``decay``,
    ``feature_map``, ``chunk_size`` ...) go to the op as they are. The layout is contiguous.
    """
    if strategy not in RECURRENT_STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(RECURRENT_STRATEGIES)}; got {strategy!r}")
    fn = RECURRENT_STRATEGIES[strategy]
    b, t = q.shape[:2]
    p = mesh_lib.axis_size(mesh, axis)
    _seq_len_check(t, p, axis, "q")
    bax = _batch_axes(mesh, axis, batch_axes, b)
    seq_spec = lambda x: PS(bax, axis) if jnp.ndim(x) >= 2 else PS()  # noqa: E731
    in_specs = [PS(bax, axis)] * 3 + [seq_spec(a) for a in args]
    inputs = [q, k, v, *args]
    extra = {}
    if segment_ids is not None:
        extra["segment_ids"] = (jnp.asarray(segment_ids, jnp.int32), PS(bax, axis))
    if initial_state is not None:
        extra["initial_state"] = (initial_state, PS(bax))
    names = list(extra)
    in_specs += [extra[n][1] for n in names]
    inputs += [extra[n][0] for n in names]
    n_pos = 3 + len(args)

    def local(*xs):
        kw = dict(zip(names, xs[n_pos:]))
        return fn(family, *xs[:n_pos], axis_name=axis, return_state=return_state, impl=impl, **kw, **kwargs)

    out_specs = (PS(bax, axis), PS(bax)) if return_state else PS(bax, axis)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*inputs)


from seqmix.parallel.config import SequenceParallel  # noqa: E402  (needs the wrappers above)

__all__ = [
    "AXES", "RECURRENT_STRATEGIES", "SOFTMAX_STRATEGIES", "SequenceParallel", "allgather_attention",
    "inverse_permutation", "lasp1",
    "lasp2", "lasp2h", "layout", "make_mesh", "mesh", "permute", "permute_inputs", "ring_attention",
    "sequence_parallel_attention", "sequence_parallel_recurrent", "striped_permutation", "ulysses_attention",
    "unpermute", "zigzag_permutation",
]
