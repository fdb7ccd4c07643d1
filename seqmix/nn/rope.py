"""Rotary position embedding (RoFormer, 2104.09864), half-split ("rotate half") layout.

Pair ``(x[..., i], x[..., i + D/2])`` of every head is rotated by the angle ``pos · theta^(-2i/D)``,
so after RoPE the product ``q_m · k_n`` depends on positions only through ``m - n``.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0):
    """fp32 ``[head_dim // 2]`` inverse frequencies ``theta^(-2i/head_dim)``."""
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2 for RoPE; got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0; got {theta!r}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, *, theta: float = 10000.0):
    """Rotate ``x [B, T, H, D]`` by integer ``positions`` ``[T]`` (shared by the batch) or ``[B, T]``.

    The rotation is computed in fp32; the result has ``x``'s dtype and shape.
    """
    if jnp.ndim(x) != 4:
        raise ValueError(f"apply_rope: x must have rank 4 ([batch, seq, heads, head_dim]); got shape {list(jnp.shape(x))}")
    b, t, _, d = x.shape
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"apply_rope: positions must be integers; got {positions.dtype}")
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"apply_rope: positions must have shape [{t}] or [{b}, {t}]; got {list(positions.shape)}")
    angle = positions.astype(jnp.float32)[..., None] * rope_frequencies(d, theta)  # [(B,) T, D/2]
    if angle.ndim == 2:
        angle = angle[None]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]  # [B|1, T, 1, D/2]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
