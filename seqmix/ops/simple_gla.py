"""Simple GLA (a scalar gate per head and token; Mamba-2's SSD form, 2405.21060; GLA, 2312.06635).

``simple_gla(q, k, v, g, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
chunk_size=64, impl=None)``

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t · scale

q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, ``g [B, T, H]`` log decay per head and token (natural log,
finite, ≤ 0; a constant ``[H]`` is also accepted, as fla's ``g_gamma``). Returns ``o`` (input dtype) or
``(o, final_state)`` fp32 ``[B, H, Dk, Dv]``. Chunked form: FAMILIES.md §2.6, scalar-gate path
(``P = (Q Kᵀ) ⊙ Γ``, ``Γ_ij = exp(G_i − G_j)`` masked in log space); the gate gradient is the closed form
``d log b_t = Σ_c (q ⊙ dq − k ⊙ dk)_tc``, reverse-cumsummed within segments in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.ops import _checks, _gated_chunk, _op_docs, _recurrent, _registry
from seqmix.ops._recurrent import RecurrentCall, prepare_recurrent, scan_reference
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent

HIGHEST = jax.lax.Precision.HIGHEST


def prepare_simple_gla(q, k, v, g, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
                       chunk_size=64) -> RecurrentCall:
    """Validate ``simple_gla``'s arguments (see the module docstring) into a RecurrentCall."""
    return prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state, return_state=return_state,
                             segment_ids=segment_ids, chunk_size=chunk_size, g=g, g_kinds=("scalar", "head"))


def _recurrence(state, x):
    """One token: ``S ← exp(g) S + k vᵀ``; ``o = Sᵀ q`` (fp32; x["g"] ``[B, H]``, q scaled)."""
    alpha = jnp.exp(x["g"])[..., None, None]
    state = alpha * state + x["k"][..., :, None] * x["v"][..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, x["q"], precision=HIGHEST)


def simple_gla_reference(call: RecurrentCall):
    """fp32 token loop (the spec)."""
    o, final = scan_reference(call, _recurrence)
    return call.finish(o, final)


def simple_gla_xla(call: RecurrentCall):
    """Chunkwise-parallel form (scalar-gate path), custom VJP with the closed-form gate gradient."""
    o, final = _gated_chunk.chunked_call(call)
    return call.finish(o, final)


def simple_gla_step(q_t, k_t, v_t, state, *, g, scale=None):
    """One decode token: ``(o_t [B, H, Dv] (q_t's dtype), state fp32 [B, H, Dk, Dv])``; g ``[B, H]``
    (this token's log decay)."""
    q, k, v, s, _ = _gated_chunk.step_inputs(q_t, k_t, v_t, state, scale, "simple_gla_step")
    _checks.require_float("g", g)
    _checks.require_shape("g", g, q.shape[:2], "[batch, heads], log decay")
    s, o = _recurrence(s, {"q": q, "k": k, "v": v, "g": jnp.asarray(g, jnp.float32)})
    return o.astype(q_t.dtype), s


DOC = _op_docs.recurrent_doc(
    "Linear attention with a scalar (per head and token) forget gate: GLA's scalar form, Mamba-2's SSD, "
    "Lightning Attention-2 with data-dependent decay.",
    """
    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t
    """,
    {"g": f"float ``[B, T, H]`` log gate per head and token, {_op_docs.LOG_GATE}."},
    _op_docs.EXAMPLE_INPUTS + """g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)) + 3)
o = ops.simple_gla(q, k, v, g)                           # [2, 100, 4, 32]
""")

simple_gla = _registry.define_family(
    "simple_gla", kind="recurrent", prepare=prepare_simple_gla, doc=DOC,
    summary="Simple GLA / Mamba-2 SSD: S_t = exp(g_t) S_{t-1} + k_t v_tᵀ with a scalar log gate per head and token.",
    reference=simple_gla_reference, xla=simple_gla_xla, describe=_gated_chunk.describe,
    kernels=(tpu_recurrent.gated_linear(), gpu_recurrent.gated_linear()),
    args=(_recurrent.gate_arg("scalar"),),
    state=_recurrent.state_spec, decode=simple_gla_step, decode_doc="simple_gla_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_recurrent.gated_summary,
    modules=("seqmix.nn.SimpleGLA",), mixers={"simple_gla": "seqmix.nn.gla"},
    make_inputs=_recurrent.recurrent_inputs,
    flops=_recurrent.chunked_flops)
