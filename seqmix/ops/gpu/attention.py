"""``attention`` on NVIDIA Hopper: lowers an :class:`AttentionCall` to the Mosaic GPU flash kernels.

The kernels (``pallas_kernels.gpu.flash_attention``) take the layout ``q [B, Hq, Tp, D]``,
``k / v [B, Hkv, Sp, ·]`` (GQA without repeated K/V), int32 coordinate rows ``(pos, rel, seg)`` and
packed block metadata; this module builds them:

1. tiles: ``H100_TILES`` when compiling for a GPU, ``INTERPRET_TILES`` (64-row blocks) in the Mosaic
   GPU interpreter on CPU (``pallas_kernels._target.gpu_interpret_params``);
2. coordinates padded to the blocks (:func:`seqmix.ops.block_meta.pad_coordinates`: padded keys get
   position −1 and are never attended);
3. EMPTY / PARTIAL / FULL per block pair from :func:`seqmix.ops.block_meta.classify_padded`, once for the
   forward's blocks and once for the backward's, packed by ``make_meta``;
4. the mask predicate (:class:`seqmix.ops.block_meta.PairPredicate`), evaluated in-kernel on PARTIAL
   blocks; masks that cannot run in a kernel are refused (:mod:`seqmix.ops.kernel_mask`).

Registered as ``Implementation("pallas_gpu", backend="mosaic_gpu")``: compiled on a GPU target, run in the
Mosaic GPU interpreter when named on CPU (how it is tested: evidence ``gpu:interpret``; ``gpu:aot`` = an
sm_90a compile with ptxas at production shapes). Automatic dispatch uses it on a GPU only for the call
cases a real-GPU run recorded (:func:`device_case`, ``seqmix/ops/gpu/device_results.json``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import _target
from pallas_kernels.gpu import flash_attention as fa
from seqmix.ops import _registry, block_meta
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention_call import AttentionCall, finish
from seqmix.ops.block_meta import pad_to
from seqmix.ops.kernel_mask import predicate_problem

COMPILED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # 16-bit wgmma operands
INTERPRETED_DTYPES = COMPILED_DTYPES + (jnp.dtype(jnp.float32),)  # exact fp32 products in the interpreter


@dataclasses.dataclass(frozen=True)
class _Plan:
    tiles: fa.FlashTiles
    interpret: object  # None: compile for the GPU; else the interpreter's parameters
    padded_q: int
    padded_kv: int


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def plan(call: AttentionCall) -> _Plan:
    interpret = _target.gpu_interpret_params()
    tiles = fa.H100_TILES if interpret is None else fa.INTERPRET_TILES
    tq, s = call.q.shape[1], call.k.shape[1]
    return _Plan(tiles, interpret, _round_up(tq, max(tiles.block_q, tiles.block_q_bwd)),
                 _round_up(s, max(tiles.block_kv, tiles.block_kv_bwd)))


def _coords(pos, rel, seg, b: int, length: int):
    """int32 ``[B, 3, length]``: rows pos, rel, seg (0 without segments)."""
    rows = [jnp.broadcast_to(pos, (b, length)), jnp.broadcast_to(rel, (b, length)),
            jnp.zeros((b, length), jnp.int32) if seg is None else seg]
    return jnp.stack(rows, axis=1).astype(jnp.int32)


def attention_pallas_gpu(call: AttentionCall):
    """Block-sparse flash attention (forward, dq and dkv Mosaic GPU kernels)."""
    p = plan(call)
    t = p.tiles
    b, tq, hq, _ = call.q.shape
    tp, sp = p.padded_q, p.padded_kv
    c = block_meta.pad_coordinates(call, tp, sp)
    fwd_meta = fa.make_meta(block_meta.classify_padded(call.mask, c, t.block_q, t.block_kv))
    bwd_meta = fa.make_meta(block_meta.classify_padded(call.mask, c, t.block_q_bwd, t.block_kv_bwd))
    cfg = fa.FlashConfig(scale=float(call.scale), soft_cap=call.soft_cap,
                         pair_fn=block_meta.PairPredicate(call.mask, segments=call.q_seg is not None),
                         has_sinks=call.sink_logits is not None, tiles=t, interpret=p.interpret)
    q = pad_to(call.q, 1, tp, 0).transpose(0, 2, 1, 3)
    k = pad_to(call.k, 1, sp, 0).transpose(0, 2, 1, 3)
    v = pad_to(call.v, 1, sp, 0).transpose(0, 2, 1, 3)
    sinks = jnp.zeros((hq,), jnp.float32) if call.sink_logits is None else call.sink_logits.astype(jnp.float32)
    o, lse = fa.flash_attention(cfg, q, k, v, sinks, _coords(c.q_pos, c.q_rel, c.q_seg, b, tp),
                                _coords(c.kv_pos, c.kv_rel, c.kv_seg, b, sp), fwd_meta, bwd_meta)
    return finish(call, o.transpose(0, 2, 1, 3)[:, :tq], lse[:, :, :tq])


def supports(call: AttentionCall) -> str | None:
    p = plan(call)
    dtype = jnp.dtype(call.q.dtype)
    allowed = COMPILED_DTYPES if p.interpret is None else INTERPRETED_DTYPES
    if dtype not in allowed:
        return (f"dtype {dtype}: the Mosaic GPU kernels take {', '.join(d.name for d in allowed)}"
                + ("" if p.interpret is not None else " on a GPU (16-bit wgmma operands)"))
    d, dv = call.q.shape[-1], call.v.shape[-1]
    for name, dim in (("head_dim", d), ("v_head_dim", dv)):
        if dim % 64 or dim > fa.MAX_TMA_BOX:
            return f"{name} {dim}: the Mosaic GPU kernels take multiples of 64 up to {fa.MAX_TMA_BOX}"
    if p.interpret is None:
        used = fa.smem_bytes(p.tiles, d, dv, dtype)
        over = {k: n for k, n in used.items() if n > fa.MAX_SMEM_BYTES}
        if over:
            return f"shared memory {over} exceeds {fa.MAX_SMEM_BYTES} bytes per block at head_dim {d}/{dv}"
    if not isinstance(call.mask, masks_lib.Full):
        return predicate_problem(call.mask)
    return None


def describe(call: AttentionCall) -> str:
    p = plan(call)
    t = p.tiles
    where = "compiled" if p.interpret is None else "Mosaic GPU interpreter"
    return (f"pallas_gpu flash kernels ({where}): fwd {t.block_q}x{t.block_kv} ({t.compute_wgs} compute "
            f"warpgroups, {t.num_stages} stages), bwd {t.block_q_bwd}x{t.block_kv_bwd}")


def device_case(call: AttentionCall) -> str:
    """The key a real-GPU run records for this call: dtype / mask type / mha|gqa / head dims, plus the
    features that take other kernel paths (segments, sinks, soft cap)."""
    extras = [name for name, on in (("segments", call.q_seg is not None), ("sinks", call.sink_logits is not None),
                                    ("softcap", call.soft_cap is not None)) if on]
    d, dv = call.q.shape[-1], call.v.shape[-1]
    return "/".join([jnp.dtype(call.q.dtype).name, type(call.mask).__name__,
                     "gqa" if call.groups > 1 else "mha", f"d{d}" if d == dv else f"d{d}v{dv}", *extras])


IMPLEMENTATION = _registry.Implementation(
    "pallas_gpu", attention_pallas_gpu, rank=10, backend="mosaic_gpu", evidence=("gpu:interpret", "gpu:aot"),
    supports=supports, describe=describe, device_case=device_case)
