"""The recurrent families on TPU: lowers a :class:`RecurrentCall` to the Pallas TPU kernels.

Two kernel families serve the six recurrent ops; each family's op file registers one of these builders:

* :func:`gated_linear` -> :mod:`pallas_kernels.tpu.gated_linear` (no / scalar / per-channel decay;
  ``linear_attention``, ``retention``, ``simple_gla``, ``gla``): the gate kind comes from the call's
  ``g`` (None, ``[B, T, H]`` or ``[B, T, H, Dk]``), the gate gradient from ``call.gate_grad``;
* :func:`delta` -> :mod:`pallas_kernels.tpu.delta_rule` (WY form, Neumann triangular inverse on the
  MXU; ``delta_rule``, ``gated_delta_rule``).

Both kernel families take the API layout, run a ``(B, H, N)`` grid with the chunk axis sequential and an
fp32 state in VMEM, and carry their own ``custom_vjp`` (reverse-chunk backward kernel). This module picks
the chunk length, the output dtype and the interpret setting (``pallas_kernels._target``). Evidence:
interpret mode on CPU against the references and ahead-of-time Mosaic compiles for v5e, v5p, v6e
(``tests/conformance``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _target
from pallas_kernels.tpu import delta_rule as dr_kernel
from pallas_kernels.tpu import gated_linear as gl_kernel
from seqmix.ops import _registry
from seqmix.ops._recurrent import RecurrentCall

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_STATE_ELEMENTS = 1 << 20  # Dk·Dv: the fp32 state (and its gradient) live in VMEM scratch (4 MiB)
MIN_CHUNK = 16  # bf16 sublane tile; also the per-channel sub-chunk
EVIDENCE = ("tpu:interpret", "tpu:aot")


def kernel_chunk(length: int, chunk_size: int) -> int:
    """The chunk length the kernels use: ``chunk_size``, shrunk to ``max(16, next_pow2(T))`` for short inputs."""
    return min(chunk_size, max(MIN_CHUNK, 1 << max(0, (length - 1).bit_length())))


def gate_kind(call: RecurrentCall) -> str:
    if call.g is None:
        return "none"
    return "scalar" if call.g.ndim == 3 else "channel"


def _common_problem(call: RecurrentCall) -> str | None:
    if jnp.dtype(call.q.dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(call.q.dtype).name} is not supported (float32 or bfloat16)"
    dk, dv = call.q.shape[-1], call.v.shape[-1]
    if dk * dv > MAX_STATE_ELEMENTS:
        return f"state d_k·d_v = {dk}·{dv} exceeds {MAX_STATE_ELEMENTS} elements (VMEM scratch)"
    return None


def _supports_gated(call: RecurrentCall) -> str | None:
    problem = _common_problem(call)
    if problem:
        return problem
    c = kernel_chunk(call.q.shape[1], call.chunk_size)
    if c % MIN_CHUNK:
        return f"chunk_size {call.chunk_size} gives a chunk of {c} rows; the kernel needs a multiple of {MIN_CHUNK}"
    return None


def _supports_delta(call: RecurrentCall) -> str | None:
    problem = _common_problem(call)
    if problem:
        return problem
    c = kernel_chunk(call.q.shape[1], call.chunk_size)
    if c < MIN_CHUNK or c & (c - 1):
        return (f"chunk_size {call.chunk_size} gives a chunk of {c} rows; the Neumann inverse needs a power "
                f"of two >= {MIN_CHUNK}")
    return None


def _grid(call: RecurrentCall, c: int) -> str:
    b, t, h, _ = call.q.shape
    return f"grid=(B={b}, H={h}, N={-(-t // c)})"


def _describe_gated(call: RecurrentCall) -> str:
    c = kernel_chunk(call.q.shape[1], call.chunk_size)
    gate = gate_kind(call)
    sub = f", sub_chunk={gl_kernel.SUB_CHUNK}" if gate == "channel" else ""
    return (f"pallas_kernels.tpu.gated_linear (seqmix_gla_fwd/bwd_{gate}): chunk={c}{sub}, gate={gate}, "
            f"{_grid(call, c)}, fp32 state in VMEM, reverse-chunk backward")


def _describe_delta(call: RecurrentCall) -> str:
    c = kernel_chunk(call.q.shape[1], call.chunk_size)
    return (f"pallas_kernels.tpu.delta_rule (seqmix_delta_fwd/bwd): chunk={c}, Neumann inverse "
            f"({2 * (c.bit_length() - 2)} fp32 {c}x{c} matmuls), {_grid(call, c)}, fp32 state in VMEM")


def _run_gated(call: RecurrentCall):
    cfg = gl_kernel.GLAConfig(
        chunk=kernel_chunk(call.q.shape[1], call.chunk_size), gate=gate_kind(call), scale=float(call.scale),
        gate_grad=call.gate_grad and call.g is not None,
        out_dtype="float32" if call.post is not None else jnp.dtype(call.q.dtype).name,
        interpret=_target.interpret_params())
    o, final = gl_kernel.gated_linear_attention(cfg, call.q, call.k, call.v, call.g, call.initial_state,
                                                call.resets)
    return call.finish(o, final)


def _run_delta(call: RecurrentCall):
    cfg = dr_kernel.DeltaConfig(chunk=kernel_chunk(call.q.shape[1], call.chunk_size), scale=float(call.scale),
                                gated=call.g is not None, out_dtype=jnp.dtype(call.q.dtype).name,
                                interpret=_target.interpret_params())
    o, final = dr_kernel.delta_rule(cfg, call.q, call.k, call.v, call.beta, call.g, call.initial_state,
                                    call.resets)
    return call.finish(o, final)


def gated_linear() -> _registry.Implementation:
    """``pallas_tpu`` for a gated-linear family (gate kind read from each call)."""
    return _registry.Implementation("pallas_tpu", _run_gated, rank=10, backend="tpu", evidence=EVIDENCE,
                                    supports=_supports_gated, describe=_describe_gated)


def delta() -> _registry.Implementation:
    """``pallas_tpu`` for a (gated) delta-rule family."""
    return _registry.Implementation("pallas_tpu", _run_delta, rank=10, backend="tpu", evidence=EVIDENCE,
                                    supports=_supports_delta, describe=_describe_delta)
