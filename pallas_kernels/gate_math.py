"""Log-gate numerics shared by every chunked recurrent form (seqmix's XLA paths and the Pallas kernels).

The chunked forms exponentiate differences of chunk-local cumsums of ``g`` (FAMILIES.md §2.6). A gate of
``-inf`` (a hard reset, which the ops accept) makes ``(−inf) − (−inf) = NaN``, and a huge finite one
(``-1e30``) swamps every other gate of the chunk in the fp32 cumsum. So the chunked forms clamp log gates
at :data:`LOG_GATE_FLOOR`: ``exp(-30) ≈ 9.4e-14``, six orders below fp32 resolution, so a clamped gate
still erases the state for every practical purpose, while adding at most 30 to the cumsum's magnitude
per clamped token (keeping the rounding of the surviving differences near 1e-6). The token-loop
references use ``g`` unclamped; the conformance suite's edge-value tests compare the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG_GATE_FLOOR = -30.0


def bounded_log_gate(g):
    """``max(g, LOG_GATE_FLOOR)`` in fp32 (None stays None). Its gradient is 0 below the floor, as the
    true gradient ``exp(g)·(…)`` is there to fp32 precision."""
    if g is None:
        return None
    return jnp.maximum(jnp.asarray(g, jnp.float32), LOG_GATE_FLOOR)


def segmented_reverse_cumsum(x, resets):
    """``y_t = x_t + y_{t+1}`` unless token t+1 starts a new segment (fp32), along axis 2 of
    ``x [B, H, Tp(, D)]``; resets bool ``[B, Tp]`` or None."""
    if resets is None:
        return jax.lax.cumsum(x, axis=2, reverse=True)
    cont = jnp.concatenate([~resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1).astype(jnp.float32)
    cont = cont[:, None] if x.ndim == 3 else cont[:, None, :, None]
    return reverse_affine_scan(jnp.broadcast_to(cont, x.shape), x, axis=2)


def reverse_affine_scan(m, x, axis: int):
    """``y_t = x_t + m_t · y_{t+1}`` along ``axis`` (``y`` past the end is 0); m, x of one shape (fp32)."""
    def combine(a, b):  # affine maps y -> x + m·y; ``a`` sits later in time
        return a[0] * b[0], b[1] + b[0] * a[1]

    _, y = jax.lax.associative_scan(combine, (m, x), reverse=True, axis=axis)
    return y
