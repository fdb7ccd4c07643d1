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

Which strategies serve a family is a fact of its record (``Family.sequence_parallel``);
:mod:`~seqmix.parallel.strategies` is the one table of strategy names and functions.
"""

from __future__ import annotations

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
from seqmix.parallel.strategies import (RECURRENT_STRATEGIES, SOFTMAX_STRATEGIES, for_family, lasp2h)
from seqmix.parallel.ulysses import ulysses_attention


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
                                mask=None, segment_ids=None, positions=None, sink_logits=None, soft_cap=None,
                                scale=None, impl=None, return_lse=False, batch_axes="auto", **strategy_kwargs):
    """:func:`seqmix.ops.attention` on global arrays, sequence-parallel over ``mesh`` axis ``axis``.

    q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, ·]``, segment_ids ``[B, T]`` (self-attention) or None;
    ``strategy`` in ``"ring" | "ulysses" | "allgather"``; ``layout`` in ``None | "zigzag" | "striped"``
    (a one-time permutation, undone on the outputs; needs T == S). ``positions`` int ``[T]`` are the
    tokens' global positions for self-attention (default ``arange``; bottom-right aligned queries when
    T < S). The batch is sharded over ``batch_axes`` (default: the mesh's data/fsdp axes of size > 1).
    Returns what the op returns, in the original order. This is the one global-array wrapper: the
    layers' :class:`SequenceParallel` calls it.
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
    self_attn = t == s
    if (layout is not None or segment_ids is not None or positions is not None) and not self_attn:
        raise ValueError(f"layout, segment_ids and positions need q and k of one length (self-attention); "
                         f"got T={t}, S={s}")
    perm = layout_lib.permutation(layout, t, p)
    if self_attn:
        pi = layout_lib.permute_inputs(perm, segment_ids=segment_ids, positions=positions,
                                       **({} if layout is None else {"q": q, "k": k, "v": v}))
        if layout is not None:
            q, k, v = pi["q"], pi["k"], pi["v"]
        q_pos = kv_pos = pi["positions"]
        seg = pi["segment_ids"]
        rel = jnp.broadcast_to(pi["relative_positions"], (b, t)) if seg is not None and mask_uses_rel(mask) else None
    else:
        q_pos, kv_pos = jnp.arange(t, dtype=jnp.int32) + (s - t), jnp.arange(s, dtype=jnp.int32)
        seg = rel = None
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
    if self_attn:  # one position array serves q and kv
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
    per_head = {a.name for a in _registry.get_family(family).args if a.role == "per_head"}
    b, t = q.shape[:2]
    p = mesh_lib.axis_size(mesh, axis)
    _seq_len_check(t, p, axis, "q")
    bax = _batch_axes(mesh, axis, batch_axes, b)
    positional = _registry.get_family(family).positional
    in_specs = [PS(bax, axis)] * 3 + [PS() if name in per_head else PS(bax, axis) for name in positional[:len(args)]]
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


def sequence_parallel_family(family: str, q, k, v, *, mesh, axis: str = "seq", strategy: str, segment_ids=None,
                             batch_axes="auto", **kwargs):
    """A family's own strategy function (its record's ``sp_functions``, e.g. MoBA's all-gather) on global
    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, ·]`` and ``segment_ids [B, T]``, over contiguous shards of
    ``mesh`` axis ``axis``; ``kwargs`` go to the function as they are. Returns o ``[B, T, Hq, Dv]``."""
    fn = for_family(family, strategy)
    b, t = q.shape[:2]
    p = mesh_lib.axis_size(mesh, axis)
    _seq_len_check(t, p, axis, "q")
    x = PS(_batch_axes(mesh, axis, batch_axes, b), axis)
    arrays = (q, k, v) + (() if segment_ids is None else (jnp.asarray(segment_ids, jnp.int32),))

    def local(q, k, v, *seg):
        return fn(q, k, v, axis_name=axis, segment_ids=seg[0] if seg else None, **kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(x,) * len(arrays), out_specs=x, check_vma=False)(*arrays)


from seqmix.parallel.config import SequenceParallel  # noqa: E402  (needs the wrappers above)

__all__ = [
    "AXES", "RECURRENT_STRATEGIES", "SOFTMAX_STRATEGIES", "SequenceParallel", "allgather_attention", "for_family",
    "inverse_permutation", "lasp1",
    "lasp2", "lasp2h", "layout", "make_mesh", "mesh", "permute", "permute_inputs", "ring_attention",
    "sequence_parallel_attention", "sequence_parallel_family", "sequence_parallel_recurrent", "striped_permutation", "ulysses_attention",
    "unpermute", "zigzag_permutation",
]
