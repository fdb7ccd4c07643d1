"""The recurrent families on NVIDIA Hopper: lowers a :class:`RecurrentCall` to the Mosaic GPU kernels.

Gated-linear families (:func:`gated_linear`):

:mod:`pallas_kernels.gpu.gated_linear` runs the chunked recurrence with a scalar decay per head and token
(``retention``, ``simple_gla``) or a per-channel one (``gla``: the anchored one-matmul form; a call
whose gates span more than 40 nats in a chunk takes the kernel module's exact plain-jnp path), with
initial / final state, segment resets and its own ``custom_vjp``; each family's op file registers
:func:`gated_linear`. ``linear_attention`` (no decay) uses it too: its normalized form (a call with a
``post``) runs the backward with ``split_cotangent`` (``dO`` as bf16 high + low parts, 2× backward work),
without which its bf16 dq missed the conformance tolerance (rms 0.00801 against 0.008: the normalizer's
gradient cancels, and rounding ``dO`` to bf16 was the dominant error).

Tiles: ``H100_TILES`` compiled for a GPU, ``INTERPRET_TILES`` in the Mosaic GPU interpreter on CPU. A
compiled call whose kernels would need more shared memory than an H100 block has (Dk above 128) is
refused by ``supports()`` with the kernel's name (:func:`shared_memory_problem`), not left to fail in the
compiler.
Evidence ``gpu:interpret`` (numerics) and ``gpu:aot``: forward, reverse state pass and chunk-parallel
backward compile for an H100 without register spills (docs/gpu_compile_report.md).

(Gated) delta rule (:func:`delta`): :mod:`pallas_kernels.gpu.delta_wy` forms the chunk-parallel WY part
(``A``, the triangular inverse as matmuls, ``U``, ``W``, the intra-chunk scores) and its VJP (two kernels
from the saved inverse), :mod:`pallas_kernels.gpu.delta_rule` runs the sequential state pass and its VJP;
the per-token gate factors between them are plain jnp. The chunk is the kernels' (64 rows: the ``wgmma``
M), whatever ``chunk_size`` the call names (the result does not depend on it). The kernels compile for an
H100 without spills (docs/gpu_compile_report.md): evidence ``gpu:interpret`` and ``gpu:aot``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import _target
from pallas_kernels.gpu import delta_rule as dr_kernel
from pallas_kernels.gpu import delta_wy as wy_kernel
from pallas_kernels.gpu import gated_linear as gl_kernel
from seqmix.ops import _registry
from seqmix.ops._recurrent import RecurrentCall
from seqmix.ops.block_meta import pad_to

COMPILED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # 16-bit wgmma operands
INTERPRETED_DTYPES = COMPILED_DTYPES + (jnp.dtype(jnp.float32),)


def _gate(call: RecurrentCall) -> str:
    if call.g is None:
        return "none"
    return "scalar" if call.g.ndim == 3 else "channel"


def _tiles(interpret) -> gl_kernel.GLATiles:
    """The tiles of every recurrent Mosaic GPU kernel: H100's when compiling, the interpreter's on CPU."""
    return gl_kernel.H100_TILES if interpret is None else gl_kernel.INTERPRET_TILES


def _config(call: RecurrentCall) -> gl_kernel.GLAGpuConfig:
    interpret = _target.gpu_interpret_params()
    return gl_kernel.GLAGpuConfig(
        scale=float(call.scale), gate=_gate(call),
        gate_grad=call.gate_grad and call.g is not None,
        out_dtype="float32" if call.post is not None else None,
        tiles=_tiles(interpret), interpret=interpret, split_cotangent=call.post is not None)


def _padded_values(call: RecurrentCall, block_dv: int):
    """v and the initial state (None stays None) zero-padded to whole ``block_dv`` value columns, which the
    kernels tile by (linear attention's normalizer appends a ones column to v: ``Dv + 1``). Zero columns
    stay zero through both recurrences; callers slice them off."""
    dvp = -(-call.v.shape[-1] // block_dv) * block_dv
    h0 = None if call.initial_state is None else pad_to(jnp.asarray(call.initial_state, jnp.float32), 3, dvp, 0)
    return pad_to(call.v, 3, dvp, 0), h0


def _where(interpret) -> str:
    return "compiled" if interpret is None else "Mosaic GPU interpreter"


def _run(call: RecurrentCall):
    cfg = _config(call)
    dv = call.v.shape[-1]
    v, h0 = _padded_values(call, cfg.tiles.block_dv)
    o, final = gl_kernel.gated_linear_attention(cfg, call.q, call.k, v, call.g, h0, call.resets)
    return call.finish(o[..., :dv], final[..., :dv])


def _smem_gated_linear(call: RecurrentCall, tiles: gl_kernel.GLATiles) -> dict[str, int]:
    need = gl_kernel.smem_bytes(tiles, call.q.shape[-1], call.v.shape[-1], call.q.dtype, _gate(call))
    return {f"gated-linear {k}": n for k, n in need.items()}


def _smem_delta(call: RecurrentCall, tiles: gl_kernel.GLATiles) -> dict[str, int]:
    dk, dv, dtype = call.q.shape[-1], call.v.shape[-1], call.q.dtype
    state = dr_kernel.smem_bytes(tiles, dk, dv, dtype, out_dtype=jnp.float32 if call.post is not None else None)
    wy = wy_kernel.smem_bytes(tiles.chunk, dk, dtype)
    return {**{f"state pass {k}": n for k, n in state.items()}, **{f"WY {k}": n for k, n in wy.items()}}


def shared_memory_problem(call: RecurrentCall, smem) -> str | None:
    """Why the H100 kernels cannot run ``call`` for lack of shared memory (None if they fit): ``smem(call,
    tiles)`` lists each kernel's buffers at the H100 tiles (the kernel modules' ``smem_bytes``)."""
    need = smem(call, gl_kernel.H100_TILES)
    name, most = max(need.items(), key=lambda item: item[1])
    if most <= gl_kernel.MAX_SMEM_BYTES:
        return None
    return (f"head_dim {call.q.shape[-1]}: the {name} kernel needs {most:,} B of shared memory, over the "
            f"{gl_kernel.MAX_SMEM_BYTES:,} B of an H100 block")


def _supports(call: RecurrentCall, smem) -> str | None:
    interpret = _target.gpu_interpret_params()
    dtype = jnp.dtype(call.q.dtype)
    if _gate(call) == "channel" and dtype == jnp.dtype(jnp.float16):
        return "per-channel gates in float16: the anchored factors (up to e^20) would overflow; use bfloat16"
    allowed = COMPILED_DTYPES if interpret is None else INTERPRETED_DTYPES
    if dtype not in allowed:
        return f"dtype {dtype}: the Mosaic GPU kernel takes {', '.join(d.name for d in allowed)} here"
    dk = call.q.shape[-1]
    if dk % 64 or dk > gl_kernel.MAX_TMA_BOX:
        return f"head_dim {dk}: the Mosaic GPU kernel takes multiples of 64 up to {gl_kernel.MAX_TMA_BOX}"
    return shared_memory_problem(call, smem) if interpret is None else None


def _describe(call: RecurrentCall) -> str:
    cfg = _config(call)
    return (f"pallas_kernels.gpu.gated_linear (seqmix_gla_fwd/bwd, {_where(cfg.interpret)}): chunk={cfg.tiles.chunk}, "
            f"block_dv={cfg.tiles.block_dv}, input ring stages={cfg.tiles.stages}, gate={cfg.gate}")


def device_case(call: RecurrentCall) -> str:
    """The key a real-GPU run records: dtype / gate kind / head dims / segments."""
    gate = _gate(call)
    seg = "/segments" if call.resets is not None else ""
    return f"{jnp.dtype(call.q.dtype).name}/{gate}/d{call.q.shape[-1]}v{call.v.shape[-1]}{seg}"


def gated_linear() -> _registry.Implementation:
    """``pallas_gpu`` for a gated-linear family (scalar or per-channel decay)."""
    return _registry.Implementation("pallas_gpu", _run, rank=10, backend="mosaic_gpu",
                                    evidence=("gpu:interpret", "gpu:aot"),
                                    supports=functools.partial(_supports, smem=_smem_gated_linear), describe=_describe,
                                    device_case=device_case)


# ----------------------------------------------------------------------------- (gated) delta rule


def _delta_config(call: RecurrentCall) -> dr_kernel.DeltaGpuConfig:
    interpret = _target.gpu_interpret_params()
    return dr_kernel.DeltaGpuConfig(
        dtype=jnp.dtype(call.q.dtype).name, out_dtype="float32" if call.post is not None else None,
        tiles=_tiles(interpret), interpret=interpret)


def _run_delta(call: RecurrentCall):
    """The WY kernel's operands, then the state-pass kernel (values padded as for gated-linear)."""
    cfg = _delta_config(call)
    b, t, h, dk = call.q.shape
    dv = call.v.shape[-1]
    v, h0 = _padded_values(call, cfg.tiles.block_dv)
    if h0 is None:
        h0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    wy_cfg = wy_kernel.WYConfig(scale=float(call.scale), dtype=cfg.dtype, chunk=cfg.tiles.chunk,
                                interpret=cfg.interpret)
    ops = wy_kernel.state_pass_operands(wy_cfg, call.q, call.k, v, call.beta, call.g, call.resets)
    o, final = dr_kernel.state_pass(cfg, *ops, h0)
    o = jnp.moveaxis(o, 1, 2)[:, :t, :, :dv]
    return call.finish(o, final[..., :dv])


def _describe_delta(call: RecurrentCall) -> str:
    cfg = _delta_config(call)
    return (f"pallas_kernels.gpu.delta_wy (seqmix_delta_wy: A, T = (I + A)^-1 as matmuls, U, W, P; VJP "
            f"seqmix_delta_wy_bwd_t/_k) "
            f"and pallas_kernels.gpu.delta_rule (state pass seqmix_delta_fwd/bwd), {_where(cfg.interpret)}: "
            f"chunk={cfg.tiles.chunk}, block_dv={cfg.tiles.block_dv}, input ring stages={cfg.tiles.stages}")


def delta() -> _registry.Implementation:
    """``pallas_gpu`` for a (gated) delta-rule family."""
    return _registry.Implementation("pallas_gpu", _run_delta, rank=10, backend="mosaic_gpu",
                                    evidence=("gpu:interpret", "gpu:aot"),
                                    supports=functools.partial(_supports, smem=_smem_delta), describe=_describe_delta,
                                    device_case=device_case)
