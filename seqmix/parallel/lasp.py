"""LASP-1 and LASP-2: sequence parallelism for the recurrent families (FAMILIES.md §4.5–§4.8).

Every recurrent family maps the state entering a shard to the state leaving it by an affine map
``S ↦ T_r(S) + S_ext,r``; the pair (transition, ``S_ext``) is the shard's **summary** (fp32). The family
record says how to compute it (``Family.sp_summary``): the gated-linear families give ``log a = Σ_t g_t``
(0 without a gate, per channel for ``gla``) and their final state from a zero state; the delta rules give
``M = Π_chunks M_[c]`` and ``S_ext`` from the WY form. ``log a = −inf`` / ``M = 0`` when the shard contains
a segment reset. A segment boundary that falls exactly on a shard boundary is a reset the local op
cannot see; the summaries carry each shard's first and last segment id, and the incoming state of a
shard that starts a new segment is zero.

* **LASP-2** (2502.07563): each shard computes its summary, **one** ``all_gather`` of the packed
  summaries (one fp32 buffer), an fp32 prefix fold over the shards before this one gives ``S_in``
  (``S ← T_j(S) + S_ext,j`` starting from ``initial_state``), and the local op reruns with
  ``initial_state = S_in``. The whole sequence's final state is the fold over all shards, identical on
  every device. Backward: autodiff (the gather's transpose is one reduce-scatter of the summaries'
  cotangents; the ops' own custom VJPs inside).
* **LASP-1** (2404.02882): the same summaries, passed along a serial ``ppermute`` chain (P − 1 hops,
  one state each); the final state is broadcast from the last device with one ``psum``.

Functions take local shards inside ``jax.shard_map`` (use ``check_vma=False``, see
:mod:`seqmix.parallel.ring`) and the family's own arguments, e.g.
``lasp2("gated_delta_rule", q, k, v, g, beta, axis_name="seq", segment_ids=seg, initial_state=h0,
return_state=True)``. Any registered recurrent family with an ``sp_summary`` works, with no edit here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqmix.ops import _registry
from seqmix.ops._recurrent import apply_summary

Array = Any
F32 = jnp.float32


def _family(family: str):
    fam = _registry.get_family(family)
    if fam.sp_summary is None:
        with_lasp = sorted(n for n, f in _registry.FAMILIES.items() if f.sp_summary is not None)
        raise ValueError(f"family {family!r} has no LASP summary; families with one: {with_lasp}")
    return fam


def _summary(fam, q, k, v, args, kwargs, seg, impl):
    """(kind, transition, S_ext) of this shard, fp32, from a zero incoming state."""
    call = fam.prepare(q, k, v, *args, segment_ids=seg, **kwargs)
    summ = fam.sp_summary(call, lambda c: fam.run(impl, c))
    return summ.kind, summ.transition, summ.s_ext.astype(F32)


def _seg_ends(seg, b: int):
    """int32 [B] first and last segment ids of the shard (zeros without segments)."""
    if seg is None:
        z = jnp.zeros((b,), jnp.int32)
        return z, z
    return seg[:, 0].astype(jnp.int32), seg[:, -1].astype(jnp.int32)


def _zero_where(flag, state):
    return jnp.where(flag.reshape((-1,) + (1,) * (state.ndim - 1)), 0.0, state)


# ----------------------------------------------------------------------------- packing (one collective)


def _pack(leaves) -> tuple[Array, list]:
    """One flat fp32 buffer from fp32 and int32 leaves (ints travel bit-cast)."""
    flat, meta = [], []
    for x in leaves:
        if jnp.issubdtype(x.dtype, jnp.integer):
            flat.append(jax.lax.bitcast_convert_type(x.astype(jnp.int32), F32).reshape(-1))
        else:
            flat.append(x.astype(F32).reshape(-1))
        meta.append((x.shape, x.dtype))
    return jnp.concatenate(flat), meta


def _unpack(buf, meta) -> list:
    """Inverse of :func:`_pack` on a gathered ``[P, X]`` buffer: leaves with a leading P axis."""
    out, off = [], 0
    p = buf.shape[0]
    for shape, dtype in meta:
        size = 1
        for s in shape:
            size *= s
        part = buf[:, off:off + size].reshape((p,) + tuple(shape))
        off += size
        if jnp.issubdtype(dtype, jnp.integer):
            part = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(part), jnp.int32)
        out.append(part)
    return out


# ----------------------------------------------------------------------------- strategies


def _prepare(family, q, k, v, args, segment_ids, initial_state, name):
    fam = _family(family)
    if len(args) != len(fam.positional):
        raise ValueError(f"{name}({family!r}): expected positional arguments (q, k, v"
                         f"{''.join(', ' + a for a in fam.positional)}); got {3 + len(args)}")
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: {arg} must be a local shard [batch, seq/P, heads, dim]; got {list(jnp.shape(x))}")
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if seg is not None and seg.shape != q.shape[:2]:
        raise ValueError(f"{name}: segment_ids must be the local [batch, seq/P] = {list(q.shape[:2])}; got {list(seg.shape)}")
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state, F32)
    return fam, seg, initial_state


def lasp2(family: str, q, k, v, *args, axis_name, segment_ids=None, initial_state=None, return_state=False,
          impl=None, **kwargs):
    """LASP-2 for recurrent ``family`` over ``axis_name``: one all-gather of shard summaries.

    q, k, v and the family's positional arguments (``g``, ``beta``: ``[B, n, ...]`` local shards; a
    per-head ``g [H]`` stays whole) and keywords (``decay``, ``feature_map``, ``chunk_size`` ...) are
    those of the family's op; ``segment_ids`` is the local ``[B, n]`` (documents may cross shards);
    ``initial_state`` (fp32 ``[B, H, Dk, Dv]``, the same on every device of the axis) feeds the
    sequence's first tokens. Returns the local ``o`` or ``(o, final_state)`` where ``final_state`` is
    the whole sequence's (the same on every device).
    """
    fam, seg, h0 = _prepare(family, q, k, v, args, segment_ids, initial_state, "lasp2")
    b = q.shape[0]
    kind, trans, s_ext = _summary(fam, q, k, v, args, kwargs, seg, impl)
    first, last = _seg_ends(seg, b)
    buf, meta = _pack([trans, s_ext, first, last])
    gathered = jax.lax.all_gather(buf, axis_name)  # [P, X]: the one collective
    trans_all, s_all, first_all, last_all = _unpack(gathered, meta)
    size = gathered.shape[0]
    # start_reset[j]: shard j begins a new segment (its incoming state is dropped); never for shard 0.
    prev_last = jnp.concatenate([first_all[:1], last_all[:-1]], axis=0)
    start_reset = (first_all != prev_last) & (jnp.arange(size) > 0)[:, None]
    s0 = jnp.zeros(s_ext.shape, F32) if h0 is None else h0

    def fold(state, xs):
        t_j, s_j, reset_j = xs
        state = _zero_where(reset_j, state)  # the state entering shard j
        return apply_summary(kind, t_j, state) + s_j, state

    final, entering = jax.lax.scan(fold, s0, (trans_all, s_all, start_reset))
    r = jax.lax.axis_index(axis_name)
    s_in = jax.lax.dynamic_index_in_dim(entering, r, axis=0, keepdims=False)
    o = fam.op(q, k, v, *args, segment_ids=seg, initial_state=s_in, impl=impl, **kwargs)
    return (o, final) if return_state else o


def lasp1(family: str, q, k, v, *args, axis_name, segment_ids=None, initial_state=None, return_state=False,
          impl=None, **kwargs):
    """LASP-1 for recurrent ``family``: a serial ``ppermute`` chain of states; arguments as :func:`lasp2`."""
    fam, seg, h0 = _prepare(family, q, k, v, args, segment_ids, initial_state, "lasp1")
    b = q.shape[0]
    size = int(jax.lax.axis_size(axis_name))
    r = jax.lax.axis_index(axis_name)
    kind, trans, s_ext = _summary(fam, q, k, v, args, kwargs, seg, impl)
    s_in = jnp.zeros(s_ext.shape, F32) if h0 is None else h0
    if size > 1:
        if seg is None:
            start_reset = jnp.zeros((b,), bool)
        else:  # a document starting exactly at this shard's first token drops the incoming state
            first, last = _seg_ends(seg, b)
            prev_last = jax.lax.ppermute(last, axis_name, [(i, i + 1) for i in range(size - 1)])
            start_reset = (r > 0) & (first != prev_last)
        s_in = jnp.where(r == 0, s_in, 0.0)
        for hop in range(size - 1):  # device `hop` now holds its true incoming state and sends its outgoing one
            out = apply_summary(kind, trans, _zero_where(start_reset, s_in)) + s_ext
            recv = jax.lax.ppermute(out, axis_name, [(hop, hop + 1)])
            s_in = jnp.where(r == hop + 1, recv, s_in)
        s_in = _zero_where(start_reset, s_in)
    o = fam.op(q, k, v, *args, segment_ids=seg, initial_state=s_in, impl=impl, **kwargs)
    if not return_state:
        return o
    final = apply_summary(kind, trans, s_in) + s_ext
    if size > 1:
        final = jax.lax.psum(jnp.where(r == size - 1, final, 0.0), axis_name)
    return o, final
