"""Gated DeltaNet: the ``gated_delta_rule`` op, its reference, its chunked XLA form and its decode step.

``gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, return_state=False,
segment_ids=None, chunk_size=64, impl=None)`` with q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``,
g ``[B, T, H]`` log decay (``<= 0``), beta ``[B, T, H]``. Returns ``o [B, T, H, Dv]`` (input dtype) or
``(o, final_state)`` with fp32 ``[B, H, Dk, Dv]`` states.

Semantics (FAMILIES.md §2.7, 2412.06464)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   α_t = exp(g_t),   o_t = S_tᵀ (scale·q_t)

With g = 0 it is ``delta_rule``. The op does not normalize q or k (the layers do); it is stable only
with L2-normalized k and β in (0, 1) (or (0, 2) for negative eigenvalues). β outside [0, 2] and
positive g are rejected on concrete input. Log decays below −80 are treated as −80 (α ≈ 1.8e-35), so
g = −inf (a full forget) is allowed.
"""

from __future__ import annotations

import functools

from seqmix.ops import _delta_chunk, _op_docs, _recurrent, _registry
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent
from seqmix.ops._recurrent import RecurrentCall

BETA_RANGE = (0.0, 2.0)


def prepare_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, return_state=False,
                             segment_ids=None, chunk_size=64) -> RecurrentCall:
    """Validate ``gated_delta_rule``'s arguments (see the module docstring) into a :class:`RecurrentCall`."""
    if beta is None:
        raise ValueError("beta (write strength, [batch, seq, heads]) is required")
    if g is None:
        raise ValueError("g (log decay, [batch, seq, heads]) is required; use delta_rule for no decay")
    return _recurrent.prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state,
                                        return_state=return_state, segment_ids=segment_ids,
                                        chunk_size=chunk_size, g=g, g_kinds=("scalar",), beta=beta,
                                        beta_range=BETA_RANGE)


def _step(state, x):
    return _delta_chunk.delta_step(state, x["q"], x["k"], x["v"], x["beta"], x["g"])


def gated_delta_rule_reference(call: RecurrentCall):
    """fp32 token loop (``S ← αS; u = β(v − Sᵀk); S ← S + k uᵀ; o = Sᵀq``): the spec."""
    o, s = _recurrent.scan_reference(call, _step)
    return call.finish(o, s)


def gated_delta_rule_xla(call: RecurrentCall):
    """Chunked WY/UT form with chunk-local gate cumsums (``_delta_chunk``), custom VJP."""
    return _delta_chunk.xla_impl(call)


def gated_delta_rule_step(q_t, k_t, v_t, state, *, g, beta, scale=None):
    """Decode one token: q_t, k_t ``[B, H, Dk]``, v_t ``[B, H, Dv]``, this token's g and beta ``[B, H]``,
    state fp32 ``[B, H, Dk, Dv]`` (None = zeros). Returns ``(o_t [B, H, Dv], state)``; iterating it equals
    the op."""
    return _delta_chunk.decode_step(q_t, k_t, v_t, state, beta_t=beta, g_t=g, scale=scale, gated=True)


DOC = _op_docs.recurrent_doc(
    "Gated DeltaNet (Yang et al., 2412.06464): the delta rule with a scalar forget gate.",
    """
    S_t = exp(g_t) S_{t-1} + β_t k_t (v_t − exp(g_t) S_{t-1}ᵀ k_t)ᵀ,      o_t = scale · S_tᵀ q_t

    Chunked WY form with the triangular inverse as matmuls. Normalize q and k to unit L2 norm per head.
    """,
    {"g": f"float ``[B, T, H]`` log gate per head and token, {_op_docs.LOG_GATE}.",
     "beta": "float ``[B, T, H]`` write strength β in [0, 2]."},
    _op_docs.EXAMPLE_INPUTS + """q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)) + 3)
beta = jax.nn.sigmoid(jax.random.normal(kg, (B, T, H)))
o, state = ops.gated_delta_rule(q, k, v, g, beta, return_state=True)
o2 = ops.gated_delta_rule(q, k, v, g, beta, initial_state=state)   # continues the first call
""")

gated_delta_rule = _registry.define_family(
    "gated_delta_rule", kind="recurrent", prepare=prepare_gated_delta_rule, doc=DOC,
    summary="Gated DeltaNet: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ with α_t = exp(g_t).",
    reference=gated_delta_rule_reference, xla=gated_delta_rule_xla, describe=_delta_chunk.describe,
    kernels=(tpu_recurrent.delta(), gpu_recurrent.delta()),
    args=(_recurrent.gate_arg("scalar"), _recurrent.beta_arg(BETA_RANGE)),
    state=_recurrent.state_spec, decode=gated_delta_rule_step, decode_doc="gated_delta_rule_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_delta_chunk.summary,
    modules=("seqmix.nn.GatedDeltaNet",), mixers={"gdn": "seqmix.nn.delta_net"},
    make_inputs=functools.partial(_recurrent.recurrent_inputs, l2_qk=True),
    flops=functools.partial(_recurrent.chunked_flops, delta=True))
