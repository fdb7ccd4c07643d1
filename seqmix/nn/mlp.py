"""SwiGLU feed-forward (Shazeer, 2002.05202): ``W_down(silu(W_gate x) ⊙ W_up x)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
    """Gated MLP ``[..., d_model] -> [..., d_model]`` with a hidden width of ``hidden``.

    Args:
      d_model: input and output width.
      hidden: width of the gate and up projections.
      use_bias: biases on the three projections.
      dtype: compute dtype (``None`` = the input's); param_dtype: parameter dtype.
    """

    def __init__(self, d_model: int, hidden: int, *, use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        for name, val in (("d_model", d_model), ("hidden", hidden)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"SwiGLU: {name} must be an int >= 1; got {val!r}")
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(d_model, hidden, **kw)
        self.up = nnx.Linear(d_model, hidden, **kw)
        self.down = nnx.Linear(hidden, d_model, **kw)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
