"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * scale`` over the last axis, statistics in fp32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis (no mean subtraction, no bias).

    Args:
      num_features: size ``D`` of the normalized (last) axis.
      eps: added to the mean square before the square root.
      dtype: output dtype; ``None`` keeps the input's dtype.
      param_dtype: dtype of ``scale`` (``[D]``, initialized to ones).

    ``__call__(x [..., D]) -> [..., D]``; the statistics are computed in fp32.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every seqmix module builds the same way
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1; got {num_features!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x):
        if jnp.shape(x)[-1:] != (self.num_features,):
            raise ValueError(f"RMSNorm: x must end in {self.num_features} features; got shape {list(jnp.shape(x))}")
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps))
        return (y * self.scale[...].astype(jnp.float32)).astype(out_dtype)
