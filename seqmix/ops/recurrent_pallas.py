"""The recurrent families on TPU: lowers a :class:`RecurrentCall` to the Pallas TPU kernels.

* ``linear_attention`` (gate "none"), ``retention`` (gate "scalar", constant per-head decay, no gate
  gradient), ``simple_gla`` (gate "scalar") and ``gla`` (gate "channel", 16-row sub-chunks) run
  :mod:`pallas_kernels.tpu.gated_linear`;
* ``delta_rule`` and ``gated_delta_rule`` run :mod:`pallas_kernels.tpu.delta_rule` (WY form, Neumann
  triangular inverse on the MXU).

Both kernel families take the API layout, run a ``(B, H, N)`` grid with the chunk axis sequential and an
fp32 state in VMEM, and carry their own ``custom_vjp`` (reverse-chunk backward kernel). This module picks
the chunk length, the output dtype and the interpret setting, and registers
``Implementation("pallas_tpu", platforms=("tpu",), rank=10)`` for each family. On CPU the same code runs in
Pallas interpret mode when named explicitly (``impl="pallas_tpu"``): that is how it is tested.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._interpret import interpret_params
from pallas_kernels.tpu import delta_rule as dr_kernel
from pallas_kernels.tpu import gated_linear as gl_kernel
from seqmix.ops import _registry
from seqmix.ops import delta_rule as _delta_rule  # noqa: F401 - registers the families
from seqmix.ops import gated_delta_rule as _gated_delta_rule  # noqa: F401
from seqmix.ops import gla as _gla  # noqa: F401
from seqmix.ops import linear_attention as _linear_attention  # noqa: F401
from seqmix.ops import retention as _retention  # noqa: F401
from seqmix.ops import simple_gla as _simple_gla  # noqa: F401
from seqmix.ops._recurrent import RecurrentCall
from seqmix.ops.linear_attention import _normalized

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_STATE_ELEMENTS = 1 << 20  # Dk·Dv: the fp32 state (and its gradient) live in VMEM scratch (4 MiB)
MIN_CHUNK = 16  # bf16 sublane tile; also the per-channel sub-chunk


def kernel_chunk(length: int, chunk_size: int) -> int:
    """The chunk length the kernels use: ``chunk_size``, shrunk to ``max(16, next_pow2(T))`` for short inputs."""
    return min(chunk_size, max(MIN_CHUNK, 1 << max(0, (length - 1).bit_length())))


def _gate(family: str) -> str:
    return {"linear_attention": "none", "retention": "scalar", "simple_gla": "scalar", "gla": "channel"}[family]


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


def _describe_gated(family: str):
    def describe(call: RecurrentCall) -> str:
        c = kernel_chunk(call.q.shape[1], call.chunk_size)
        gate = _gate(family)
        sub = f", sub_chunk={gl_kernel.SUB_CHUNK}" if gate == "channel" else ""
        return (f"pallas_kernels.tpu.gated_linear (seqmix_gla_fwd/bwd_{gate}): chunk={c}{sub}, gate={gate}, "
                f"{_grid(call, c)}, fp32 state in VMEM, reverse-chunk backward")
    return describe


def _describe_delta(call: RecurrentCall) -> str:
    c = kernel_chunk(call.q.shape[1], call.chunk_size)
    return (f"pallas_kernels.tpu.delta_rule (seqmix_delta_fwd/bwd): chunk={c}, Neumann inverse "
            f"({2 * (c.bit_length() - 2)} fp32 {c}x{c} matmuls), {_grid(call, c)}, fp32 state in VMEM")


def _gated_impl(family: str):
    gate = _gate(family)

    def run(call: RecurrentCall):
        normalize = bool(call.option("normalize", False))
        cfg = gl_kernel.GLAConfig(
            chunk=kernel_chunk(call.q.shape[1], call.chunk_size), gate=gate, scale=float(call.scale),
            gate_grad=family != "retention",
            out_dtype="float32" if normalize else jnp.dtype(call.q.dtype).name,
            interpret=interpret_params())
        o, final = gl_kernel.gated_linear_attention(cfg, call.q, call.k, call.v, call.g, call.initial_state,
                                                    call.resets)
        if family == "linear_attention":
            o = _normalized(call, o)
        return call.finish(o, final)

    run.__name__ = f"{family}_pallas_tpu"
    return run


def delta_pallas_tpu(call: RecurrentCall):
    cfg = dr_kernel.DeltaConfig(chunk=kernel_chunk(call.q.shape[1], call.chunk_size), scale=float(call.scale),
                                gated=call.g is not None, out_dtype=jnp.dtype(call.q.dtype).name,
                                interpret=interpret_params())
    o, final = dr_kernel.delta_rule(cfg, call.q, call.k, call.v, call.beta, call.g, call.initial_state,
                                    call.resets)
    return call.finish(o, final)


GATED_FAMILIES = ("linear_attention", "retention", "simple_gla", "gla")
DELTA_FAMILIES = ("delta_rule", "gated_delta_rule")

IMPLEMENTATIONS = {}
for _fam in GATED_FAMILIES:
    IMPLEMENTATIONS[_fam] = _registry.Implementation(
        "pallas_tpu", _gated_impl(_fam), platforms=("tpu",), rank=10, supports=_supports_gated,
        describe=_describe_gated(_fam))
for _fam in DELTA_FAMILIES:
    IMPLEMENTATIONS[_fam] = _registry.Implementation(
        "pallas_tpu", delta_pallas_tpu, platforms=("tpu",), rank=10, supports=_supports_delta,
        describe=_describe_delta)
for _fam, _impl in IMPLEMENTATIONS.items():
    if "pallas_tpu" not in _registry.get_family(_fam).implementations:  # idempotent on re-import
        _registry.register_implementation(_fam, _impl)
