"""LASP-1 and LASP-2: sequence parallelism for the recurrent families (FAMILIES.md §4.5–§4.8).

Every recurrent family maps the state entering a shard to the state leaving it by an affine map
``S ↦ T_r(S) + S_ext,r``; the pair (transition, ``S_ext``) is the shard's **summary** (fp32):

| family | transition ``T_r`` | computed from |
|---|---|---|
| ``linear_attention`` | ``log a ∈ {0, −inf}`` per (batch, head) | the op's final state from a zero state |
| ``retention``, ``simple_gla`` | ``log a = Σ_t g_t`` per (batch, head) | ``g`` (or ``decay``); the op's final state |
| ``gla`` | ``log a = Σ_t g_t ∈ R^{d_k}`` | ``g``; the op's final state |
| ``delta_rule``, ``gated_delta_rule`` | ``M ∈ R^{d_k×d_k}`` | :func:`seqmix.ops._delta_chunk.chunk_summary` |

``log a = −inf`` (``a = 0``) and ``M = 0`` when the shard contains a segment reset (its end state no
longer depends on the incoming one). A segment boundary that falls exactly on a shard boundary is a
reset the local op cannot see; the summaries carry each shard's first and last segment id, and the
incoming state of a shard that starts a new segment is zero.

* **LASP-2** (2502.07563): each shard computes its summary, **one** ``all_gather`` of the packed
  summaries (one fp32 buffer), an fp32 prefix fold over the shards before this one gives ``S_in``
  (``S ← T_j(S) + S_ext,j`` starting from ``initial_state``), and the local op reruns with
  ``initial_state = S_in``. This general mechanism is exact for every family (the FAMILIES.md linear
  correction is an optimization it skips). The whole sequence's final state is the fold over all
  shards, identical on every device (no further collective). Backward: autodiff (the gather's transpose
  is one reduce-scatter of the summaries' cotangents; the ops' own custom VJPs inside).
* **LASP-1** (2404.02882): the same summaries, passed along a serial ``ppermute`` chain (P − 1 hops,
  one state each: at hop h only device h sends); the final state is broadcast from the last device
  with one ``psum``. Backward: the reverse chain (autodiff). Low memory, serial latency.

Functions take local shards inside ``jax.shard_map`` (use ``check_vma=False``, see
:mod:`seqmix.parallel.ring`) and the family's own arguments, e.g.
``lasp2("gated_delta_rule", q, k, v, g, beta, axis_name="seq", segment_ids=seg, initial_state=h0,
return_state=True)``; per-family entry points (``lasp2_gla`` ...) are registered in the capability
matrix by :func:`register_families`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from seqmix.ops import _registry

Array = Any
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class RecurrentSpec:
    """How to summarize one shard of a recurrent family.

    family: registry name. args: names of the op's positional arguments after (q, k, v).
    kind: transition type: ``"none"`` (a ∈ {0, 1}), ``"scalar"`` (log a per head), ``"channel"``
    (log a per key channel) or ``"matrix"`` (``M``, delta rules).
    """

    family: str
    args: tuple[str, ...]
    kind: str


SPECS = {
    "linear_attention": RecurrentSpec("linear_attention", (), "none"),
    "retention": RecurrentSpec("retention", (), "scalar"),
    "simple_gla": RecurrentSpec("simple_gla", ("g",), "scalar"),
    "gla": RecurrentSpec("gla", ("g",), "channel"),
    "delta_rule": RecurrentSpec("delta_rule", ("beta",), "matrix"),
    "gated_delta_rule": RecurrentSpec("gated_delta_rule", ("g", "beta"), "matrix"),
}


def _spec(family: str) -> RecurrentSpec:
    if family not in SPECS:
        raise ValueError(f"no LASP summary for family {family!r}; supported: {sorted(SPECS)}")
    if family not in _registry.FAMILIES:
        raise ValueError(f"family {family!r} is not registered (import seqmix.ops.{family} first)")
    return SPECS[family]


def _op(family: str) -> Callable:
    return _registry.get_family(family).op


# ----------------------------------------------------------------------------- summaries


def _local_reset(seg, b: int) -> Array:
    """bool [B]: whether the shard has a reset after its first token."""
    if seg is None:
        return jnp.zeros((b,), bool)
    return jnp.any(seg[:, 1:] != seg[:, :-1], axis=1)


def _summary(spec: RecurrentSpec, q, k, v, args, kwargs, seg, impl):
    """(transition, S_ext) of this shard, fp32, from a zero incoming state."""
    b, n = q.shape[:2]
    named = dict(zip(spec.args, args))
    if spec.kind == "matrix":
        from seqmix.ops import _delta_chunk

        return _delta_chunk.chunk_summary(k, v, named["beta"], named.get("g"), segment_ids=seg,
                                          chunk_size=kwargs.get("chunk_size", 64))
    _, s_ext = _op(spec.family)(q, k, v, *args, segment_ids=seg, return_state=True, impl=impl, **kwargs)
    h = s_ext.shape[1]
    if spec.kind == "none":
        log_a = jnp.zeros((b, h), F32)
    elif spec.family == "retention":
        decay = jax.lax.stop_gradient(jnp.asarray(kwargs["decay"], F32))
        log_a = jnp.broadcast_to(n * decay, (b, h))
    else:
        g = jnp.asarray(named["g"], F32)
        log_a = jnp.broadcast_to(n * g, (b, h)) if g.ndim == 1 else g.sum(axis=1)
    reset = _local_reset(seg, b).reshape((b,) + (1,) * (log_a.ndim - 1))
    return jnp.where(reset, -jnp.inf, log_a), s_ext.astype(F32)


def _apply(kind: str, trans, state):
    """T(state) for one shard's transition (fp32)."""
    if kind == "matrix":
        return jnp.einsum("bhde,bhev->bhdv", trans, state, precision=jax.lax.Precision.HIGHEST)
    a = jnp.exp(trans)
    return (a[..., None, None] if kind in ("none", "scalar") else a[..., :, None]) * state


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
    spec = _spec(family)
    if len(args) != len(spec.args):
        raise ValueError(f"{name}({family!r}): expected positional arguments (q, k, v"
                         f"{''.join(', ' + a for a in spec.args)}); got {3 + len(args)}")
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name}: {arg} must be a local shard [batch, seq/P, heads, dim]; got {list(jnp.shape(x))}")
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if seg is not None and seg.shape != q.shape[:2]:
        raise ValueError(f"{name}: segment_ids must be the local [batch, seq/P] = {list(q.shape[:2])}; got {list(seg.shape)}")
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state, F32)
    return spec, seg, initial_state


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
    spec, seg, h0 = _prepare(family, q, k, v, args, segment_ids, initial_state, "lasp2")
    b = q.shape[0]
    trans, s_ext = _summary(spec, q, k, v, args, kwargs, seg, impl)
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
        return _apply(spec.kind, t_j, state) + s_j, state

    final, entering = jax.lax.scan(fold, s0, (trans_all, s_all, start_reset))
    r = jax.lax.axis_index(axis_name)
    s_in = jax.lax.dynamic_index_in_dim(entering, r, axis=0, keepdims=False)
    o = _op(family)(q, k, v, *args, segment_ids=seg, initial_state=s_in, impl=impl, **kwargs)
    return (o, final) if return_state else o


def lasp1(family: str, q, k, v, *args, axis_name, segment_ids=None, initial_state=None, return_state=False,
          impl=None, **kwargs):
    """LASP-1 for recurrent ``family``: a serial ``ppermute`` chain of states; arguments as :func:`lasp2`."""
    spec, seg, h0 = _prepare(family, q, k, v, args, segment_ids, initial_state, "lasp1")
    b = q.shape[0]
    size = int(jax.lax.axis_size(axis_name))
    r = jax.lax.axis_index(axis_name)
    trans, s_ext = _summary(spec, q, k, v, args, kwargs, seg, impl)
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
            out = _apply(spec.kind, trans, _zero_where(start_reset, s_in)) + s_ext
            recv = jax.lax.ppermute(out, axis_name, [(hop, hop + 1)])
            s_in = jnp.where(r == hop + 1, recv, s_in)
        s_in = _zero_where(start_reset, s_in)
    o = _op(family)(q, k, v, *args, segment_ids=seg, initial_state=s_in, impl=impl, **kwargs)
    if not return_state:
        return o
    final = _apply(spec.kind, trans, s_in) + s_ext
    if size > 1:
        final = jax.lax.psum(jnp.where(r == size - 1, final, 0.0), axis_name)
    return o, final


def _named(strategy: Callable, family: str) -> Callable:
    fn = functools.partial(strategy, family)
    fn.__name__ = f"{strategy.__name__}_{family}"
    fn.__doc__ = f"{strategy.__name__} for ``{family}`` (see :func:`seqmix.parallel.lasp.{strategy.__name__}`)."
    return fn


def register_families() -> list[str]:
    """Register LASP-1 / LASP-2 for every supported recurrent family present in the registry now."""
    done = []
    for family in SPECS:
        if family in _registry.FAMILIES:
            _registry.register_parallel(family, "lasp2", _named(lasp2, family))
            _registry.register_parallel(family, "lasp1", _named(lasp1, family))
            done.append(family)
    return done
