"""Ring attention (Ring Attention, 2310.01889; FAMILIES.md §4.1).

Call inside ``jax.shard_map`` with local shards ``[B, n, H, D]`` (n = N / P) and the name of the
sequence axis. Positions are the shard's **global** positions, so a zigzag or striped permutation
(:mod:`seqmix.parallel.layout`) needs nothing but the permuted position arrays.

Forward: a ``lax.scan`` over the ring. At step s the device holds the KV shard of device
``(r − s) mod P``; it first issues the ``ppermute`` of k, v and their positions / segment ids /
relative positions to the next device (P − 1 hops in all), then runs the single-device
:func:`seqmix.ops.attention` on (local q, current kv) with ``return_lse=True`` and merges the partial
result into an fp32 ``(o, lse)`` carry (FAMILIES.md §3.4). Sink logits join once, after the ring.

Backward: a ``jax.custom_vjp`` that keeps only q, k, v (local), the output and the **single global
lse** as residuals (no per-step residuals). It rotates k, v again and, one step behind them, the fp32
dk/dv accumulators (each device adds its contribution for the block it held at the previous step, so
the shift of the accumulators does not wait for this step's compute; a final shift returns them to
their owners: P hops). Each step's gradients come from the single-device op's own VJP, driven so that
every probability is ``exp(s − lse_global)``: with the step's recomputed ``(o_j, lse_j)`` and
``w = exp(lse_j − lse_global)`` the op receives ``do_j = w·dO`` and ``dlse_j = rowsum(do_j·o_j) − w·D``
(``D = rowsum(dO·O) − dlse``), so its ``p ⊙ (dP − delta)`` equals the global one. Masks use the same
rotated positions in both passes. Cost: the op's VJP reruns the step's forward (the op has no
backward-only entry taking an external ``(o, lse)``), so the backward does one extra forward per step
in exchange for memory that stays O(local shard) whatever P is.

Steps whose whole (q shard, kv shard) block is empty under the mask and segment ids (classified once
per step from position and segment ranges, exactly as the op classifies its own blocks) skip compute
with ``lax.cond``; inside a step the op skips its own empty blocks.

JAX note: the ops are not typed for ``shard_map``'s varying-value checks yet, so use
``jax.shard_map(..., check_vma=False)`` (as :func:`seqmix.parallel.sequence_parallel_attention` does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.softmax_math import sink_grad
from seqmix.ops import block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention import attention, merge_lse
from seqmix.parallel import _common

Array = Any
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: masks_lib.Mask
    scale: float
    soft_cap: float | None
    impl: Any
    axis_name: Any
    size: int  # P
    unroll: int
    has_seg: bool
    rotate_rel: bool  # kv relative positions travel with kv (else they are kv positions)
    has_sink: bool


def _perm(size: int):
    return [(i, (i + 1) % size) for i in range(size)]


def _shift(st: _Static, tree):
    """Send every leaf to the next device on the ring."""
    return jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, st.axis_name, _perm(st.size)), tree)


def _rels(st: _Static, qm, km):
    q_pos, q_seg, q_rel = qm
    kv_pos, kv_seg, kv_rel = km
    if not st.rotate_rel:
        q_rel, kv_rel = q_pos[None], kv_pos[None]
    return q_rel, kv_rel


def _active(st: _Static, qm, km):
    """Whether any (query, key) pair of this step may be allowed (False only if provably none is)."""
    q_pos, q_seg, _ = qm
    kv_pos, kv_seg, _ = km
    q_rel, kv_rel = _rels(st, qm, km)
    cls = block_meta.classify_blocks(st.mask, q_pos, kv_pos, q_rel, kv_rel, q_seg if st.has_seg else None,
                                    kv_seg if st.has_seg else None, jnp.ones(q_pos.shape, bool),
                                    q_pos.shape[0], kv_pos.shape[0])
    return cls[0, 0] != masks_lib.EMPTY


def _step_fn(st: _Static, qm, km):
    """The single-device op on (q, k, v) with this step's global metadata: returns (o, lse)."""
    q_pos, q_seg, _ = qm
    kv_pos, kv_seg, _ = km
    rel = _rels(st, qm, km)
    seg = (q_seg, kv_seg) if st.has_seg else None

    def f(q, k, v):
        return attention(q, k, v, mask=st.mask, segment_ids=seg, scale=st.scale, soft_cap=st.soft_cap,
                         return_lse=True, q_positions=q_pos, kv_positions=kv_pos, relative_positions=rel,
                         impl=st.impl)
    return f


def _forward(st: _Static, q, k, v, sink, qm, km0):
    b, n, hq, _ = q.shape
    dv = v.shape[-1]

    def partial(kv):
        k_j, v_j, km = kv

        def compute(_):
            o, lse = _step_fn(st, qm, km)(q, k_j, v_j)
            return o.astype(F32), lse

        def skip(_):
            return jnp.zeros((b, n, hq, dv), F32), jnp.full((b, hq, n), -jnp.inf, F32)

        return jax.lax.cond(_active(st, qm, km), compute, skip, None)

    def merge(acc, kv):
        o_j, lse_j = partial(kv)
        return merge_lse(acc[0], acc[1], o_j, lse_j)

    acc = (jnp.zeros((b, n, hq, dv), F32), jnp.full((b, hq, n), -jnp.inf, F32))

    def body(carry, _):
        acc, kv = carry
        nxt = _shift(st, kv)  # issued before this step's compute, which does not wait for it
        return (merge(acc, kv), nxt), None

    (acc, nxt), _ = jax.lax.scan(body, (acc, (k, v, km0)), None, length=st.size - 1, unroll=st.unroll)
    o, lse = merge(acc, nxt)
    if st.has_sink:
        lse_sink = jnp.broadcast_to(sink.astype(F32)[None, :, None], lse.shape)
        o, lse = merge_lse(o, lse, jnp.zeros_like(o), lse_sink)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Static, q, k, v, sink, qm, km):
    return _forward(st, q, k, v, sink, qm, km)


def _ring_fwd(st, q, k, v, sink, qm, km):
    o, lse = _forward(st, q, k, v, sink, qm, km)
    return (o, lse), (q, k, v, sink, qm, km, o, lse)


def _ring_bwd(st, res, cts):
    q, k, v, sink, qm, km0, o, lse = res
    do, dlse = cts
    do32 = do.astype(F32)
    dlse = jnp.zeros_like(lse) if dlse is None else dlse.astype(F32)
    delta = jnp.einsum("bthd,bthd->bht", do32, o.astype(F32)) - dlse  # D = rowsum(dO·O) − dlse
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    to_bth1 = lambda x: jnp.swapaxes(x, 1, 2)[..., None]  # noqa: E731  [B, H, T] -> [B, T, H, 1]

    def contribution(kv):
        """fp32 (dq, dk, dv) of (local q, kv) with probabilities exp(s − lse_global)."""
        k_j, v_j, km = kv

        def compute(_):
            (o_j, lse_j), vjp = jax.vjp(_step_fn(st, qm, km), q, k_j, v_j)
            w = jnp.where(lse_j == -jnp.inf, 0.0, jnp.exp(lse_j - lse_safe))
            do_j = (to_bth1(w) * do32).astype(o_j.dtype)
            dlse_j = jnp.einsum("bthd,bthd->bht", do_j.astype(F32), o_j.astype(F32)) - w * delta
            dq, dk, dv = vjp((do_j, dlse_j))
            return dq.astype(F32), dk.astype(F32), dv.astype(F32)

        def skip(_):
            return jnp.zeros(q.shape, F32), jnp.zeros(k_j.shape, F32), jnp.zeros(v_j.shape, F32)

        return jax.lax.cond(_active(st, qm, km), compute, skip, None)

    # Step 0 on the local block; its kv leaves first.
    kv = (k, v, km0)
    kv_next = _shift(st, kv)
    dq, dk_p, dv_p = contribution(kv)
    acc = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))  # for the block held at the previous step
    pending = (dk_p, dv_p)

    def body(carry, _):
        dq, kv, acc, pending = carry
        kv_next = _shift(st, kv)
        acc = _shift(st, (acc[0] + pending[0], acc[1] + pending[1]))  # now for the block held now
        dq_j, dk_j, dv_j = contribution(kv)
        return (dq + dq_j, kv_next, acc, (dk_j, dv_j)), None

    carry = (dq, kv_next, acc, pending)
    if st.size > 2:
        carry, _ = jax.lax.scan(body, carry, None, length=st.size - 2, unroll=st.unroll)
    dq, kv, acc, pending = carry
    # Last step (no kv shift), then one shift returns dk, dv to their owners.
    acc = _shift(st, (acc[0] + pending[0], acc[1] + pending[1]))
    dq_j, dk_j, dv_j = contribution(kv)
    dk, dv = _shift(st, (acc[0] + dk_j, acc[1] + dv_j))
    dq = dq + dq_j
    dsink = None
    if st.has_sink:
        # this shard's rows; shard_map sums the shards
        dsink = sink_grad(sink, lse, delta).astype(sink.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsink, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, *, axis_name, mask=None, q_positions=None, kv_positions=None, segment_ids=None,
                   relative_positions=None, sink_logits=None, soft_cap=None, scale=None, impl=None,
                   return_lse=False, scan_unroll: int = 1):
    """Ring attention over the mesh axis ``axis_name``; call inside ``jax.shard_map``.

    q ``[B, n, Hq, D]``, k ``[B, s, Hkv, D]``, v ``[B, s, Hkv, Dv]``: this device's shards.
    q_positions ``[n]`` / kv_positions ``[s]``: their **global** positions (default: contiguous shards,
    ``axis_index · n + arange(n)``). segment_ids: the local ``[B, n]`` (self-attention) or a pair
    ``(q_seg [B, n], kv_seg [B, s])``. relative_positions: optional ``(q_rel, kv_rel)`` global
    segment-relative positions of the local tokens (``[B or 1, n]``, ``[B or 1, s]``); when omitted and
    the mask reads them (sinks, prefix-LM), they are computed with one all-gather of the int metadata.
    mask, sink_logits ``[Hq]``, soft_cap, scale, impl: as :func:`seqmix.ops.attention`.
    Returns the local ``o [B, n, Hq, Dv]`` (q's dtype) or ``(o, lse)`` with lse fp32 ``[B, Hq, n]``.
    """
    name = "ring_attention"
    _common.check_qkv(name, q, k, v)
    b, n, hq, d = q.shape
    s = k.shape[1]
    mask = masks_lib.Full() if mask is None else mask
    size = _common.axis_size(axis_name)
    q_seg, kv_seg = _common.split_segments(segment_ids, b, n, s, name)
    if size == 1:
        return attention(q, k, v, mask=mask, segment_ids=None if q_seg is None else (q_seg, kv_seg), scale=scale,
                         sink_logits=sink_logits, soft_cap=soft_cap, return_lse=return_lse,
                         q_positions=_common.positions_or_default(q_positions, n, axis_name, "q_positions", name),
                         kv_positions=_common.positions_or_default(kv_positions, s, axis_name, "kv_positions", name),
                         relative_positions=relative_positions, impl=impl)
    q_pos = _common.positions_or_default(q_positions, n, axis_name, "q_positions", name)
    self_attn = q_seg is kv_seg and q_positions is kv_positions and n == s
    kv_pos = q_pos if self_attn else _common.positions_or_default(kv_positions, s, axis_name, "kv_positions", name)
    has_seg = q_seg is not None
    if relative_positions is not None:
        q_rel, kv_rel = _common.check_relative(relative_positions, b, n, s, name)
        rotate_rel = True
    elif has_seg and _common.mask_uses_rel(mask):
        q_rel, _ = _common.gathered_relative(q_pos, q_seg, axis_name)
        kv_rel = q_rel if self_attn else _common.gathered_relative(kv_pos, kv_seg, axis_name)[0]
        rotate_rel = True
    else:  # without segments rel == pos; rel-free masks ignore it
        q_rel, kv_rel = q_pos[None], kv_pos[None]
        rotate_rel = False
    if sink_logits is not None and tuple(jnp.shape(sink_logits)) != (hq,):
        raise ValueError(f"{name}: sink_logits must be [q_heads] = [{hq}]; got {list(jnp.shape(sink_logits))}")
    st = _Static(mask, _common.default_scale(scale, d), soft_cap, impl, axis_name, size, int(scan_unroll),
                 has_seg, rotate_rel, sink_logits is not None)
    sink = sink_logits if sink_logits is not None else jnp.zeros((hq,), q.dtype)
    # None leaves are not rotated (no ppermute is issued for them).
    qm = (q_pos, q_seg, q_rel if rotate_rel else None)
    km = (kv_pos, kv_seg, kv_rel if rotate_rel else None)
    o, lse = _ring(st, q, k, v, sink, qm, km)
    return (o, lse) if return_lse else o
