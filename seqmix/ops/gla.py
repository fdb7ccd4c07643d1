"""Gated Linear Attention (2312.06635): a per-channel gate (FAMILIES.md §2.6).

``gla(q, k, v, g, *, scale=None, initial_state=None, return_state=False, segment_ids=None, chunk_size=64,
impl=None)``

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t · scale

q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, ``g [B, T, H, Dk]`` log decay per key channel (natural log,
finite, ≤ 0). Returns ``o`` (input dtype) or ``(o, final_state)`` fp32 ``[B, H, Dk, Dv]``. Chunked form:
FAMILIES.md §2.6 with secondary chunking (sub-chunks of 16 rows anchored at their first row, so both matmul
factors are ≤ 1; diagonal sub-blocks elementwise in fp32); the gate gradient is the closed form
``d log b_t = q ⊙ dq − k ⊙ dk``, reverse-cumsummed within segments in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.ops import _checks, _gated_chunk, _op_docs, _recurrent, _registry
from seqmix.ops._recurrent import RecurrentCall, prepare_recurrent, scan_reference
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent

HIGHEST = jax.lax.Precision.HIGHEST


def prepare_gla(q, k, v, g, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
                chunk_size=64) -> RecurrentCall:
    """Validate ``gla``'s arguments (see the module docstring) into a RecurrentCall."""
    return prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state, return_state=return_state,
                             segment_ids=segment_ids, chunk_size=chunk_size, g=g, g_kinds=("channel",))


def _recurrence(state, x):
    """One token: ``S ← Diag(exp(g)) S + k vᵀ``; ``o = Sᵀ q`` (fp32; x["g"] ``[B, H, Dk]``, q scaled)."""
    alpha = jnp.exp(x["g"])[..., :, None]
    state = alpha * state + x["k"][..., :, None] * x["v"][..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, x["q"], precision=HIGHEST)


def gla_reference(call: RecurrentCall):
    """fp32 token loop (the spec)."""
    o, final = scan_reference(call, _recurrence)
    return call.finish(o, final)


def gla_xla(call: RecurrentCall):
    """Chunkwise-parallel form with secondary chunking, custom VJP with the closed-form gate gradient."""
    o, final = _gated_chunk.chunked_call(call)
    return call.finish(o, final)


def gla_step(q_t, k_t, v_t, state, *, g, scale=None):
    """One decode token: ``(o_t [B, H, Dv] (q_t's dtype), state fp32 [B, H, Dk, Dv])``; g ``[B, H, Dk]``
    (this token's log decay per channel)."""
    q, k, v, s, _ = _gated_chunk.step_inputs(q_t, k_t, v_t, state, scale, "gla_step")
    _checks.require_float("g", g)
    _checks.require_shape("g", g, q.shape, "[batch, heads, d_k], log decay per channel")
    s, o = _recurrence(s, {"q": q, "k": k, "v": v, "g": jnp.asarray(g, jnp.float32)})
    return o.astype(q_t.dtype), s


DOC = _op_docs.recurrent_doc(
    "Gated Linear Attention (Yang et al., 2312.06635): linear attention with a per-channel forget gate.",
    """
    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

    Runs chunkwise-parallel (matmuls inside chunks, one fp32 state pass across them) with a hand-written
    backward that stores no per-token state.
    """,
    {"g": f"float ``[B, T, H, Dk]`` per-channel log gate, {_op_docs.LOG_GATE}; e.g. "
          "``jax.nn.log_sigmoid(x) / 16`` as in the paper."},
    _op_docs.EXAMPLE_INPUTS + """g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, D))) / 16
o, state = ops.gla(q, k, v, g, return_state=True)        # o [2, 100, 4, 32], state [2, 4, 32, 32]
""")

gla = _registry.define_family(
    "gla", kind="recurrent", prepare=prepare_gla, doc=DOC,
    summary="Gated Linear Attention: S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ with a per-channel log gate.",
    reference=gla_reference, xla=gla_xla, describe=_gated_chunk.describe,
    kernels=(tpu_recurrent.gated_linear(), gpu_recurrent.gated_linear()),
    args=(_recurrent.gate_arg("channel"),),
    state=_recurrent.state_spec, decode=gla_step, decode_doc="gla_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_recurrent.gated_summary,
    modules=("seqmix.nn.GatedLinearAttention",), mixers={"gla": "seqmix.nn.gla"},
    make_inputs=_recurrent.recurrent_inputs,
    flops=_recurrent.chunked_flops)
