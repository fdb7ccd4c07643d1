"""Feature maps for linear attention (FAMILIES.md §2.4): the fixed ones by name, and Hedgehog's learnable map.

Fixed maps (computed by ``seqmix.ops.linear_attention``; listed here so layers can validate names):
``"identity"``, ``"elu"`` (elu + 1), ``"relu"``, ``"taylor"`` (Based). :func:`feature_map` turns a name
into a callable ``[..., D] -> [..., D']``.

Hedgehog (2402.04347): a per-head linear map ``z = W_h x + b_h`` (``W_h`` initialized to the identity,
``b_h`` to 0) followed by ``φ(x) = softmax([2z, −2z])`` over the ``2D`` features: the max-subtracted
("stable") form of ``[exp(2z), exp(−2z)]`` (fla's normalization convention). The scale of φ cancels in
normalized linear attention, so the softmax only keeps it finite. The map is trained by
:func:`attention_distillation_loss`: the cross-entropy between softmax attention weights (the
teacher) and the linear attention weights ``φ(q_i)·φ(k_j) / Σ_{j'≤i} φ(q_i)·φ(k_j')``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.ops.linear_attention import FEATURE_MAPS as FIXED_FEATURE_MAPS
from seqmix.ops.linear_attention import apply_feature_map, feature_dim

LEARNED_FEATURE_MAPS = ("hedgehog",)
FEATURE_MAP_NAMES = tuple(FIXED_FEATURE_MAPS) + LEARNED_FEATURE_MAPS

__all__ = ["FEATURE_MAP_NAMES", "FIXED_FEATURE_MAPS", "HedgehogFeatureMap", "attention_distillation_loss",
           "feature_dim", "feature_map"]


def feature_map(name: str) -> Callable:
    """The fixed map called ``name`` as a callable ``x [..., D] -> [..., D']`` (fp32 inside, x's dtype out)."""
    if not isinstance(name, str) or name not in FIXED_FEATURE_MAPS:
        raise ValueError(f"feature_map: name must be one of {list(FIXED_FEATURE_MAPS)} (fixed maps; "
                         f"'hedgehog' is learned: use HedgehogFeatureMap); got {name!r}")
    return functools.partial(apply_feature_map, name)


class HedgehogFeatureMap(nnx.Module):
    """Hedgehog's learnable feature map, one linear map per head.

    Args:
      num_heads: ``H``; head_dim: ``D`` (input and linear-map width; the output has ``2D`` features).
      dtype: output dtype (None = the input's); param_dtype: dtype of ``weight [H, D, D]`` (identity
        init) and ``bias [H, D]`` (zeros).

    ``__call__(x [B, T, H, D]) -> [B, T, H, 2D]``: ``softmax([2z, −2z])`` with ``z = x W_h + b_h``,
    computed in fp32; every feature is positive and the features of a token sum to 1.
    """

    def __init__(self, num_heads: int, head_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic (identity) init
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"HedgehogFeatureMap: {name} must be an int >= 1; got {val!r}")
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.weight = nnx.Param(jnp.broadcast_to(jnp.eye(head_dim, dtype=param_dtype),
                                                 (num_heads, head_dim, head_dim)))
        self.bias = nnx.Param(jnp.zeros((num_heads, head_dim), param_dtype))

    @property
    def out_dim(self) -> int:
        return 2 * self.head_dim

    def __call__(self, x):
        if jnp.ndim(x) < 2 or tuple(jnp.shape(x)[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(f"HedgehogFeatureMap: x must end in [heads, head_dim] = "
                             f"[{self.num_heads}, {self.head_dim}]; got shape {list(jnp.shape(x))}")
        z = jnp.einsum("...hd,hde->...he", x.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) + self.bias[...].astype(jnp.float32)
        phi = jax.nn.softmax(jnp.concatenate([2.0 * z, -2.0 * z], axis=-1), axis=-1)
        return phi.astype(self.dtype or x.dtype)


def attention_distillation_loss(q, k, phi_q, phi_k, *, scale=None, segment_ids=None, eps: float = 1e-12):
    """Hedgehog's attention-distillation loss (a scalar, fp32).

    q, k ``[B, T, H, D]``: the teacher's queries and keys (softmax weights ``softmax_j(scale·q_i·k_j)``,
    causal, gradient stopped); phi_q, phi_k ``[B, T, H, D']``: the student's features (linear weights
    ``φ(q_i)·φ(k_j) / Σ_{j'≤i} φ(q_i)·φ(k_j')``). ``segment_ids [B, T]`` limits both to a document.
    Returns the cross-entropy ``−Σ_j A_soft[i, j] log A_lin[i, j]`` averaged over batch, heads and rows.
    Needs positive features (e.g. :class:`HedgehogFeatureMap`). ``scale`` defaults to ``D^-0.5``.
    """
    for name, x in (("q", q), ("k", k), ("phi_q", phi_q), ("phi_k", phi_k)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"attention_distillation_loss: {name} must be [batch, seq, heads, dim]; got "
                             f"shape {list(jnp.shape(x))}")
    if q.shape != k.shape or phi_q.shape != phi_k.shape or q.shape[:3] != phi_q.shape[:3]:
        raise ValueError(f"attention_distillation_loss: q/k {list(q.shape)}, {list(k.shape)} and phi_q/phi_k "
                         f"{list(phi_q.shape)}, {list(phi_k.shape)} must agree in [batch, seq, heads]")
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    hi = jax.lax.Precision.HIGHEST
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    s = jnp.einsum("bihd,bjhd->bhij", f32(q), f32(k), precision=hi) * scale
    teacher = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1))
    a = jnp.einsum("bihd,bjhd->bhij", f32(phi_q), f32(phi_k), precision=hi)
    a = jnp.where(allowed, a, 0.0)
    a = a / (jnp.sum(a, axis=-1, keepdims=True) + eps)
    ce = -jnp.sum(jnp.where(allowed, teacher * jnp.log(a + eps), 0.0), axis=-1)  # [B, H, T]
    return jnp.mean(ce)
