"""The sequential chunk loop of the recurrent Mosaic GPU kernels (``gated_linear``, ``delta_rule``).

Each of their kernels runs on the grid ``(Dv / block_dv, H, B)`` (axis names ``dv``, ``h``, ``b``), one
warpgroup per CTA, and carries an fp32 ``[Dk, block_dv]`` tile (a state or its cotangent) in registers
through a ``fori_loop`` over the chunks: loaded from a ``[B, H, Dk, Dv]`` input, stored to a
``[B, H, Dk, Dv]`` output at the end. :func:`run_chunks` is that loop; a kernel supplies the step and the
TMA copies of a chunk's inputs, which run ``stages − 1`` chunks ahead into a ring of SMEM slots, so that a
chunk's loads overlap the previous chunks' compute (one CTA of one warpgroup fills an SM's shared memory,
so nothing else on the SM hides a synchronous load).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.flash_attention import _Lane, load, plgpu


class Chunk(NamedTuple):
    """Where a step is: chunk ``n`` (token rows ``rows``), value columns ``cols`` (Dv tile ``j``), head
    ``h``, batch row ``b``."""

    n: Any
    rows: Any
    cols: Any
    j: Any
    h: Any
    b: Any


def tile(lane: _Lane, ref):
    """A 2-D SMEM tile as a WGMMA-layout register value (a plain load in the interpreter)."""
    if lane.interpret:
        return ref[...]
    return load(ref, plgpu.Layout.WGMMA)


def matmul_sum(shape, *pairs):
    """``Σ a @ b`` over ``(a_ref, b_ref)`` SMEM pairs in one fp32 WGMMA accumulator."""

    def body(acc_ref):
        for a_ref, b_ref in pairs:
            plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def run_chunks(lane: _Lane, step: Callable, loads: Callable, *, stages: int, ring_bar, first_ref, last_ref,
               carry_s, bar, n_chunks: int, chunk: int, block_dv: int, reverse: bool = False) -> None:
    """Load this CTA's ``[Dk, block_dv]`` tile of ``first_ref`` (via the fp32 SMEM tile ``carry_s`` and the
    barrier ``bar``), run ``carry = step(Chunk, slot, carry)`` over the chunks (last to first if ``reverse``)
    and store the final carry to ``last_ref``.

    ``loads(Chunk, slot)`` lists a chunk's ``(GMEM view, SMEM ring tile)`` copies into ring slot ``slot``
    (the kernel's input tiles carry a leading ``stages`` axis; ``ring_bar`` has ``stages`` barriers, each
    expecting that many arrivals). Step ``t`` first issues the copies of chunk ``t + stages − 1``, then waits
    for its own. Before that, the previous step's SMEM -> GMEM copies have drained and its SMEM reads are
    fenced against new TMA writes, so a step may reuse every tile, and a ring slot is refilled only after the
    step that read it returned (its ``wgmma`` results were read, which waits for them)."""
    j, hi, bi = lax.axis_index("dv"), lax.axis_index("h"), lax.axis_index("b")
    cols = pl.ds(pl.multiple_of(j * block_dv, block_dv), block_dv)
    plgpu.copy_gmem_to_smem(first_ref.at[bi, hi, :, cols], carry_s, bar)

    def at(t):
        n = n_chunks - 1 - t if reverse else t
        return Chunk(n, pl.ds(pl.multiple_of(n * chunk, chunk), chunk), cols, j, hi, bi)

    def issue(t):
        slot = lax.rem(t, stages)
        for src, dst in loads(at(t), slot):
            plgpu.copy_gmem_to_smem(src, dst, ring_bar.at[slot])

    for t in range(min(stages - 1, n_chunks)):
        issue(t)
    plgpu.barrier_wait(bar)

    def body(t, carry):
        plgpu.wait_smem_to_gmem(0)
        # Order the previous step's generic-proxy reads of the SMEM tiles before this step's TMA writes
        # into them (an async-proxy fence; jax 0.12's interpreter reports the write-after-read race without it).
        plgpu.commit_smem()
        ahead = t + stages - 1
        pl.when(ahead < n_chunks)(lambda: issue(ahead))
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(ring_bar.at[slot])
        return step(at(t), slot, carry)

    carry = lax.fori_loop(0, n_chunks, body, tile(lane, carry_s))
    plgpu.wait_smem_to_gmem(0)
    carry_s[...] = carry
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(carry_s, last_ref.at[bi, hi, :, cols])
    plgpu.wait_smem_to_gmem(0)
