"""DeltaNet: the ``delta_rule`` op, its reference, its chunked XLA form and its decode step.

``delta_rule(q, k, v, beta, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
chunk_size=64, impl=None)`` with q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, beta ``[B, T, H]``.
Returns ``o [B, T, H, Dv]`` (input dtype) or ``(o, final_state)`` with fp32 ``[B, H, Dk, Dv]`` states.

Semantics (FAMILIES.md §2.7, 2102.11174 / 2406.06484)::

    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ (scale·q_t)

The op does not normalize q or k (the layers do). It is stable only with L2-normalized k and β in
(0, 1) (Householder eigenvalues in [0, 1]) or β in (0, 2) (negative eigenvalues allowed); without
normalized k the state and the chunk inverse grow geometrically. β outside [0, 2] is rejected on
concrete input. ``segment_ids`` reset the state to 0 where the segment changes.
"""

from __future__ import annotations

import functools

from seqmix.ops import _delta_chunk, _op_docs, _recurrent, _registry
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent
from seqmix.ops._recurrent import RecurrentCall

BETA_RANGE = (0.0, 2.0)


def prepare_delta_rule(q, k, v, beta, *, scale=None, initial_state=None, return_state=False,
                       segment_ids=None, chunk_size=64) -> RecurrentCall:
    """Validate ``delta_rule``'s arguments (see the module docstring) into a :class:`RecurrentCall`."""
    if beta is None:
        raise ValueError("beta (write strength, [batch, seq, heads]) is required")
    return _recurrent.prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state,
                                        return_state=return_state, segment_ids=segment_ids,
                                        chunk_size=chunk_size, beta=beta, beta_range=BETA_RANGE)


def _step(state, x):
    return _delta_chunk.delta_step(state, x["q"], x["k"], x["v"], x["beta"])


def delta_rule_reference(call: RecurrentCall):
    """fp32 token loop (``S ← S + k β(v − Sᵀk)ᵀ; o = Sᵀq``): the spec."""
    o, s = _recurrent.scan_reference(call, _step)
    return call.finish(o, s)


def delta_rule_xla(call: RecurrentCall):
    """Chunked WY/UT form (``_delta_chunk``), custom VJP storing one state per chunk."""
    return _delta_chunk.xla_impl(call)


def delta_rule_step(q_t, k_t, v_t, state, *, beta, scale=None):
    """Decode one token: q_t, k_t ``[B, H, Dk]``, v_t ``[B, H, Dv]``, this token's beta ``[B, H]``, state
    fp32 ``[B, H, Dk, Dv]`` (None = zeros). Returns ``(o_t [B, H, Dv], state)``; iterating it equals the op."""
    return _delta_chunk.decode_step(q_t, k_t, v_t, state, beta_t=beta, scale=scale, gated=False)


DOC = _op_docs.recurrent_doc(
    "DeltaNet (Schlag et al. 2102.11174; chunked as in Yang et al. 2406.06484): linear attention whose "
    "state is updated by the delta rule.",
    """
    S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ,      o_t = scale · S_tᵀ q_t

    Chunked WY form with the triangular inverse as matmuls. Normalize q and k to unit L2 norm per head
    (as DeltaNet does) for a stable recurrence.
    """,
    {"beta": "float ``[B, T, H]`` write strength β in [0, 2] (``jax.nn.sigmoid`` gives (0, 1); up to 2 "
             "allows negative eigenvalues)."},
    _op_docs.EXAMPLE_INPUTS + """q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
beta = jax.nn.sigmoid(jax.random.normal(kg, (B, T, H)))
o = ops.delta_rule(q, k, v, beta)                        # [2, 100, 4, 32]
""")

delta_rule = _registry.define_family(
    "delta_rule", kind="recurrent", prepare=prepare_delta_rule, doc=DOC,
    summary="DeltaNet: delta-rule fast weights S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ.",
    reference=delta_rule_reference, xla=delta_rule_xla, describe=_delta_chunk.describe,
    kernels=(tpu_recurrent.delta(), gpu_recurrent.delta()),
    args=(_recurrent.beta_arg(BETA_RANGE),),
    state=_recurrent.state_spec, decode=delta_rule_step, decode_doc="delta_rule_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_delta_chunk.summary,
    modules=("seqmix.nn.DeltaNet",), mixers={"deltanet": "seqmix.nn.delta_net"},
    make_inputs=functools.partial(_recurrent.recurrent_inputs, l2_qk=True),
    flops=functools.partial(_recurrent.chunked_flops, delta=True))
