"""Retention (RetNet, 2307.08621; Lightning Attention, 2401.04658): a fixed decay per head (FAMILIES.md §2.5).

``retention(q, k, v, *, decay, scale=None, initial_state=None, return_state=False, segment_ids=None,
chunk_size=64, impl=None)``

    S_t = γ_h S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ q_t · scale,      decay_h = log γ_h ≤ 0

q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, ``decay [H]`` (natural log, finite, ≤ 0). Returns ``o`` (input
dtype) or ``(o, final_state)`` fp32 ``[B, H, Dk, Dv]``. The chunked form is the scalar-gate path of
:mod:`seqmix.ops._gated_chunk` (exponents ``decay·(i − j)`` with ``i ≥ j`` only: never ``γ^{-j}``).
``decay`` is a fixed hyperparameter and receives **no gradient** (FAMILIES.md §2.5: data-independent
``g_gamma``, no gate gradient; both implementations stop it). For a learnable per-head decay use
``simple_gla(q, k, v, g=jnp.broadcast_to(decay, (B, T, H)))``, which has the closed-form gate gradient.

Decay presets: :func:`retnet_decay` and :func:`lightning_decay`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks, _gated_chunk, _op_docs, _recurrent, _registry
from seqmix.ops._recurrent import RecurrentCall, prepare_recurrent, scan_reference
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent

HIGHEST = jax.lax.Precision.HIGHEST


def retnet_decay(num_heads: int):
    """RetNet's per-head log decay ``log(1 − 2^{−5−h})``, h = 0..H−1 (fp32 ``[H]``)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    h = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - h))), jnp.float32)


def lightning_decay(num_heads: int, layer: int, num_layers: int):
    """Lightning / TransNormerLLM log decay ``−(8/H)(1 − l/L)·h`` for layer ``l`` of ``L`` (fp32 ``[H]``).

    FAMILIES.md §2.5; ``layer`` is 0-based (layer 0 decays fastest; head 0 does not decay).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}); got {layer!r}")
    h = np.arange(num_heads, dtype=np.float64)
    return jnp.asarray(-(8.0 / num_heads) * (1.0 - layer / num_layers) * h, jnp.float32)


def _check_decay(decay, heads: int):
    if decay is None:
        raise ValueError(f"retention needs decay: log γ per head, shape [{heads}] (e.g. retnet_decay({heads}))")
    _checks.require_float("decay", decay)
    _checks.require_shape("decay", decay, (heads,), "[heads], log γ_h")
    if not isinstance(decay, jax.core.Tracer):  # numpy on concrete values: never staged into a trace
        concrete = np.asarray(decay, np.float32)
        if not np.all(concrete <= 0):  # also rejects NaN
            raise ValueError(f"decay is log γ and must be <= 0 (no NaN); got max {np.max(concrete):.4g}")
    return jnp.asarray(decay, jnp.float32)


def prepare_retention(q, k, v, *, decay, scale=None, initial_state=None, return_state=False, segment_ids=None,
                      chunk_size=64) -> RecurrentCall:
    """Validate ``retention``'s arguments into a RecurrentCall whose g is decay broadcast to ``[B, T, H]``."""
    _checks.require_rank("q", q, 4, "[batch, seq, heads, head_dim]")
    decay = jax.lax.stop_gradient(_check_decay(decay, q.shape[2]))
    return prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state, return_state=return_state,
                             segment_ids=segment_ids, chunk_size=chunk_size, g=decay, g_kinds=("head",),
                             gate_grad=False)


def _recurrence(state, x):
    """One token: ``S ← γ S + k vᵀ``; ``o = Sᵀ q`` (fp32; x["g"] = log γ ``[B, H]``, q scaled)."""
    gamma = jnp.exp(x["g"])[..., None, None]
    state = gamma * state + x["k"][..., :, None] * x["v"][..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, x["q"], precision=HIGHEST)


def retention_reference(call: RecurrentCall):
    """fp32 token loop (the spec)."""
    o, final = scan_reference(call, _recurrence)
    return call.finish(o, final)


def retention_xla(call: RecurrentCall):
    """Chunkwise-parallel form (scalar-gate path), custom VJP."""
    o, final = _gated_chunk.chunked_call(call)
    return call.finish(o, final)


def retention_step(q_t, k_t, v_t, state, *, decay, scale=None):
    """One decode token: ``(o_t [B, H, Dv] (q_t's dtype), state fp32 [B, H, Dk, Dv])``; decay ``[H]``."""
    q, k, v, s, _ = _gated_chunk.step_inputs(q_t, k_t, v_t, state, scale, "retention_step")
    g = jnp.broadcast_to(_check_decay(decay, q.shape[1]), q.shape[:2])
    s, o = _recurrence(s, {"q": q, "k": k, "v": v, "g": g})
    return o.astype(q_t.dtype), s


DOC = _op_docs.recurrent_doc(
    "Retention (RetNet, 2307.08621) / Lightning Attention: linear attention with a constant decay per head.",
    """
    S_t = exp(decay_h) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t

    Positions enter through the decay (and the RoPE a module applies to q, k); RetNet's own decays are
    ``ops.retnet_decay(H)``.
    """,
    {"decay": "float ``[H]`` log decay per head (<= 0), e.g. ``ops.retnet_decay(H)`` = "
              "``log(1 - 2^(-5-h))``. A fixed hyperparameter: it receives no gradient."},
    _op_docs.EXAMPLE_INPUTS + """o = ops.retention(q, k, v, decay=ops.retnet_decay(H))    # [2, 100, 4, 32]
""")

retention = _registry.define_family(
    "retention", kind="recurrent", prepare=prepare_retention, doc=DOC,
    summary="Retention (RetNet, Lightning): S_t = γ_h S_{t-1} + k_t v_tᵀ with a fixed per-head decay.",
    reference=retention_reference, xla=retention_xla, describe=_gated_chunk.describe,
    kernels=(tpu_recurrent.gated_linear(), gpu_recurrent.gated_linear()),
    args=(_registry.ArgSpec("decay", "per_head", ("H",), gate="scalar", differentiable=False),),
    state=_recurrent.state_spec, decode=retention_step, decode_doc="retention_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_recurrent.gated_summary,
    modules=("seqmix.nn.Retention",), mixers={"retnet": "seqmix.nn.retention"},
    make_inputs=_recurrent.recurrent_inputs,
    flops=_recurrent.chunked_flops)
