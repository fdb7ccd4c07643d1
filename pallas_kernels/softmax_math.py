"""Softmax-family formulas shared by the Pallas kernels' ``custom_vjp`` and ``seqmix``'s XLA paths (pure jnp)."""

from __future__ import annotations

import jax.numpy as jnp


def sink_grad(sinks, lse, delta):
    """``d b_h = −Σ_{batch, rows} exp(b_h − lse_i)·D_i`` (FAMILIES.md §2.1), fp32 ``[Hq]``.

    sinks ``[Hq]``; lse, delta ``[B, Hq, T]`` with ``delta = rowsum(dO∘O) − dlse``. A row with no allowed
    key has ``lse = b_h`` (weight 1); ``lse = -inf`` cannot occur with a sink but is guarded anyway.
    """
    lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    w = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_safe)
    w = jnp.where(jnp.isfinite(lse), w, 1.0)
    return -(w * delta).sum((0, 2))
