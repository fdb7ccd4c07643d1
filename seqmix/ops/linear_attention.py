"""Linear attention (Transformers are RNNs, 2006.16236) with feature maps (Based, FAMILIES.md §2.4).

``linear_attention(q, k, v, *, feature_map="identity", normalize=False, eps=1e-6, scale=None,
initial_state=None, return_state=False, segment_ids=None, chunk_size=64, impl=None)``

    S_t = S_{t-1} + φ(k_t) v_tᵀ,        o_t = S_tᵀ φ(q_t) · scale
    normalize=True:  z_t = z_{t-1} + φ(k_t),   o_t = (S_tᵀ φ(q_t)·scale) / (z_tᵀ φ(q_t)·scale + eps)

q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``; returns ``o [B, T, H, Dv]`` (input dtype) or
``(o, final_state)`` with ``return_state=True``.

Feature maps (applied to q and k before the recurrence, in fp32, cast back to the input dtype):

* ``"identity"``: ``φ(x) = x`` (Dk' = Dk);   ``"elu"``: ``elu(x) + 1`` (Dk);   ``"relu"``: ``relu(x)`` (Dk);
* ``"taylor"`` (Based, 2402.18668): ``[1, x/d^{1/4}, (x_i x_j)_{i≤j}/√d]`` with the diagonal terms × 1/√2, so
  ``φ(q)·φ(k) = 1 + s + s²/2`` with ``s = q·k/√d`` (Dk' = 1 + d + d(d+1)/2; 153 at d = 16);
* a callable ``[B, T, H, Dk] -> [B, T, H, Dk']`` (e.g. a learned Hedgehog map), applied as is; the op
  stays differentiable through it.

seqmix rules fixed here:

* ``scale`` defaults to ``Dk^-0.5`` of the *input* head dim (before the feature map).
* With ``normalize=True`` the scale multiplies numerator and denominator alike (fla's convention), so it
  only sets the relative size of ``eps``. Use positive maps (``elu``, ``taylor``: ``1 + s + s²/2 > 0``) with
  the normalizer; signed maps can make the denominator vanish (FAMILIES.md §5.1 rule 6).
* State shapes: ``initial_state``/``final_state`` are fp32 ``[B, H, Dk', Dv]`` with ``Dk'`` the feature dim.
  With ``normalize=True`` the state is ``[B, H, Dk', Dv + 1]``: the normalizer ``z`` rides along as the
  last column (the recurrence runs on ``[v, 1]``), so chaining calls and decoding stay exact.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from seqmix.ops import _checks, _gated_chunk, _op_docs, _recurrent, _registry
from seqmix.ops._recurrent import RecurrentCall, prepare_recurrent, scan_reference
from seqmix.ops.gpu import recurrent as gpu_recurrent
from seqmix.ops.tpu import recurrent as tpu_recurrent

HIGHEST = jax.lax.Precision.HIGHEST
FEATURE_MAPS = ("identity", "elu", "relu", "taylor")


# ----------------------------------------------------------------------------- feature maps


def taylor_feature_map(x):
    """Based's 2nd-order Taylor map ``[1, x/d^{1/4}, (x ⊗ x)_{i≤j}/√d (diagonal × 1/√2)]`` on the last axis."""
    d = x.shape[-1]
    i, j = jnp.triu_indices(d)
    weight = jnp.where(i == j, 1.0 / math.sqrt(2.0), 1.0).astype(x.dtype) / math.sqrt(d)
    quad = x[..., i] * x[..., j] * weight
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate([ones, x / d ** 0.25, quad], axis=-1)


def _elu_plus_one(x):
    """``elu(x) + 1`` as ``x + 1`` or ``exp(x)``: ``expm1(x) + 1`` loses the small values of negative x to
    cancellation (relative error 1e-3 at x = -10, and exactly 0 below x = -17, where the map must stay > 0)."""
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.where(x > 0, 0.0, x)))  # the inner where: no inf gradient


_NAMED: dict[str, Callable] = {
    "identity": lambda x: x,
    "elu": _elu_plus_one,
    "relu": jax.nn.relu,
    "taylor": taylor_feature_map,
}


def feature_dim(feature_map, head_dim: int) -> int | None:
    """Dk' for a named map (None for a callable: its output decides)."""
    if callable(feature_map):
        return None
    return 1 + head_dim + head_dim * (head_dim + 1) // 2 if feature_map == "taylor" else head_dim


def _resolve_feature_map(feature_map) -> tuple[Callable, str]:
    if callable(feature_map):
        return feature_map, "callable"
    if isinstance(feature_map, str) and feature_map in _NAMED:
        return _NAMED[feature_map], feature_map
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)} or a callable "
                     f"[B, T, H, Dk] -> [B, T, H, Dk']; got {feature_map!r}")


def apply_feature_map(feature_map, x, *, name: str = "x"):
    """φ(x) over the last axis. Named maps run in fp32; the result has x's dtype."""
    fn, kind = _resolve_feature_map(feature_map)
    if kind != "callable":
        return fn(jnp.asarray(x, jnp.float32)).astype(x.dtype)
    y = fn(x)
    if jnp.ndim(y) != jnp.ndim(x) or tuple(jnp.shape(y)[:-1]) != tuple(jnp.shape(x)[:-1]):
        raise ValueError(f"feature_map(callable) must map {name} {list(jnp.shape(x))} to "
                         f"{list(jnp.shape(x)[:-1]) + ['Dk_feat']}; got {_checks.shape_str(y)}")
    _checks.require_float(f"feature_map({name})", y)
    return jnp.asarray(y).astype(x.dtype)


# ----------------------------------------------------------------------------- prepare


def prepare_linear_attention(q, k, v, *, feature_map="identity", normalize=False, eps=1e-6, scale=None,
                             initial_state=None, return_state=False, segment_ids=None,
                             chunk_size=64) -> RecurrentCall:
    """Validate ``linear_attention``'s arguments (see the module docstring) into a RecurrentCall.

    The feature map is applied here, so the call carries ``φ(q), φ(k)`` ``[B, T, H, Dk']`` and, with
    ``normalize=True``, ``[v, 1]`` ``[B, T, H, Dv + 1]``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.require_rank(name, x, 4, "[batch, seq, heads, head_dim]")
        _checks.require_float(name, x)
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {list(q.shape)} [batch, seq, heads, d_k]; got k {list(k.shape)}")
    _, kind = _resolve_feature_map(feature_map)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool; got {normalize!r}")
    eps = _checks.require_positive("eps", eps, allow_none=False)
    dk = q.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    fq = apply_feature_map(feature_map, q, name="q")
    fk = apply_feature_map(feature_map, k, name="k")
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    options = (("feature_map", kind), ("normalize", normalize), ("eps", eps))
    return prepare_recurrent(fq, fk, v, scale=scale, initial_state=initial_state, return_state=return_state,
                             segment_ids=segment_ids, chunk_size=chunk_size, options=options,
                             post=_normalized if normalize else None)


def _normalized(call: RecurrentCall, o):
    """Divide by the normalizer column (the call's ``post`` with ``normalize=True``; fp32).

    On rows ``[B·T·H, Dv + 1]``: the gradient's reduction over Dv ran 16× slower on ``[1, T, H, Dv]`` (XLA:CPU
    with jax 0.10.2 and a size-1 batch axis; 27 → 1.7 ms at T = 8192, H = 4, see ``_recurrent.to_chunks``)."""
    rows = o.reshape(-1, o.shape[-1])
    out = rows[:, :-1] / (rows[:, -1:] + call.option("eps"))
    return out.reshape(o.shape[:-1] + (o.shape[-1] - 1,))


# ----------------------------------------------------------------------------- reference and step


def _recurrence(state, x):
    """One token: ``S ← S + φ(k) vᵀ``; ``o = Sᵀ φ(q)`` (x: fp32 ``q`` (scaled), ``k``, ``v``)."""
    state = state + x["k"][..., :, None] * x["v"][..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, x["q"], precision=HIGHEST)


def linear_attention_reference(call: RecurrentCall):
    """fp32 token loop (the spec)."""
    o, final = scan_reference(call, _recurrence)
    return call.finish(o, final)


def linear_attention_xla(call: RecurrentCall):
    """Chunkwise-parallel form (FAMILIES.md §2.6 with all gates 0), custom VJP."""
    o, final = _gated_chunk.chunked_call(call)
    return call.finish(o, final)


def linear_attention_step(q_t, k_t, v_t, state, *, feature_map="identity", normalize=False, eps=1e-6,
                          scale=None):
    """One decode token: ``(o_t, state)`` with o_t ``[B, H, Dv]`` (q_t's dtype) and the fp32 state.

    q_t, k_t ``[B, H, Dk]`` (raw, before the feature map), v_t ``[B, H, Dv]``; state ``[B, H, Dk', Dv]``
    (``Dv + 1`` with ``normalize=True``) or None for zeros. Exactly the op's recurrence.
    """
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.require_rank(f"linear_attention_step: {name}", x, 3, "[batch, heads, head_dim]")
    if scale is None:
        scale = 1.0 / math.sqrt(q_t.shape[-1])
    eps = _checks.require_positive("eps", eps, allow_none=False)
    fq = apply_feature_map(feature_map, q_t[:, None], name="q_t")[:, 0]
    fk = apply_feature_map(feature_map, k_t[:, None], name="k_t")[:, 0]
    if normalize:
        v_t = jnp.concatenate([v_t, jnp.ones(v_t.shape[:-1] + (1,), v_t.dtype)], axis=-1)
    q, k, v, s, _ = _gated_chunk.step_inputs(fq, fk, v_t, state, scale, "linear_attention_step")
    s, o = _recurrence(s, {"q": q, "k": k, "v": v})
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.astype(q_t.dtype), s


# ----------------------------------------------------------------------------- registration

DOC = _op_docs.recurrent_doc(
    "Linear attention (Katharopoulos et al., 2006.16236) with a feature map: identity, elu+1, relu, "
    "Based's Taylor map (2402.18668) or your own (e.g. a learned Hedgehog map).",
    """
    S_t = S_{t-1} + φ(k_t) v_tᵀ,      o_t = scale · S_tᵀ φ(q_t)
    normalize=True:   o_t = scale · S_tᵀ φ(q_t) / (scale · z_tᵀ φ(q_t) + eps),   z_t = z_{t-1} + φ(k_t)

    The state has the feature dim ``Dk'`` of φ (``1 + Dk + Dk(Dk+1)/2`` for "taylor"); with
    ``normalize=True`` it is ``[B, H, Dk', Dv + 1]`` (the normalizer rides along as the last column).
    """,
    {"feature_map": "``\"identity\"``, ``\"elu\"`` (elu(x) + 1), ``\"relu\"``, ``\"taylor\"`` "
                    "(Based: φ(q)·φ(k) = 1 + s + s²/2 with s = q·k/√Dk) or a callable "
                    "``[B, T, H, Dk] -> [B, T, H, Dk']``.",
     "normalize": "divide by the running normalizer (use a positive map: elu, taylor).",
     "eps": "added to the normalizer's denominator."},
    _op_docs.EXAMPLE_INPUTS + """o = ops.linear_attention(q, k, v, feature_map="elu", normalize=True)   # [2, 100, 4, 32]
o, state = ops.linear_attention(q, k, v, feature_map="taylor", return_state=True)  # state [2, 4, 561, 32]
""",
    returns="``o`` ``[B, T, H, Dv]`` in the input dtype, or ``(o, final_state)`` (float32 ``[B, H, Dk', Dv]``, "
            "``Dv + 1`` columns with ``normalize=True``) when ``return_state=True``.")

linear_attention = _registry.define_family(
    "linear_attention", kind="recurrent", prepare=prepare_linear_attention, doc=DOC,
    summary="Linear attention S_t = S_{t-1} + φ(k_t)v_tᵀ with feature maps (identity, elu+1, relu, Based "
            "Taylor, callable) and an optional normalizer.",
    reference=linear_attention_reference, xla=linear_attention_xla, describe=_gated_chunk.describe,
    kernels=(tpu_recurrent.gated_linear(), gpu_recurrent.gated_linear()),
    args=(_registry.ArgSpec("feature_map", "option", example="elu"),
          _registry.ArgSpec("normalize", "option", example=True),
          _registry.ArgSpec("eps", "option", example=1e-6)),
    state=_recurrent.state_spec, decode=linear_attention_step, decode_doc="linear_attention_step (recurrent state)",
    sequence_parallel=("lasp2", "lasp1"), sp_summary=_recurrent.gated_summary,
    modules=("seqmix.nn.LinearAttention", "seqmix.nn.Based"),
    mixers={"linear": "seqmix.nn.linear_attention", "hedgehog": "seqmix.nn.linear_attention",
            "based": "seqmix.nn.based"},
    make_inputs=_recurrent.recurrent_inputs,
    flops=_recurrent.chunked_flops)
