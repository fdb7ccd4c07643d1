"""Neighborhood attention layers for vision and video, and the ``na`` mixer for 1-D language models.

``NeighborhoodAttention1D/2D/3D``: channels-last inputs ``x [B, X, C]``, ``[B, X, Y, C]``,
``[B, X, Y, Z, C]`` (NATTEN's and Flax's vision layout) -> the same shape: a fused qkv projection, one
``seqmix.ops.neighborhood_attention`` call (per-dimension kernel, dilation, stride, causal; GQA), an
output projection. Optional axial RoPE: the head dimension is split into one even part per spatial axis,
each rotated by the token's coordinate along that axis, so q·k depends on the offset per axis.

Mixer ``na:K`` / ``na:K:D`` (1-D, causal): an :class:`~seqmix.nn.attention.Attention` layer whose mask is
``CausalNeighborhood(K, D)`` (the last K keys spaced D apart, the query's own included), so packed
documents, sequence parallelism and decoding (a ring of (K − 1)·D + 1 keys) come with it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from seqmix import ops
from seqmix.nn.attention import Attention
from seqmix.nn.mixer import register_mixer
from seqmix.nn.rope import apply_rope
from seqmix.ops.neighborhood_mask import per_dim


def _positive(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1; got {value!r}")
    return value


class NeighborhoodAttention(nnx.Module):
    """Neighborhood self-attention over an ``ndim``-D grid (use the 1D/2D/3D subclasses).

    Args:
      dim: channels ``C`` (input and output features).
      num_heads: query heads ``H``; num_kv_heads: key/value heads (divides ``H``; default ``H``).
      kernel_size, dilation, stride, is_causal: NATTEN's options, an int (bool) or one per spatial axis.
      head_dim: per-head width (default ``dim // num_heads``).
      rope: axial rotary embeddings (``head_dim`` divisible by ``2·ndim``), ``rope_theta`` base.
      qkv_bias / proj_bias: biases of the qkv and output projections (NATTEN's defaults: True).
      dtype, param_dtype: compute and parameter dtypes; impl: passed to the op (None = automatic).
    """

    ndim: int = 0

    def __init__(self, dim: int, num_heads: int, *, kernel_size, dilation=1, stride=1, is_causal=False,
                 num_kv_heads: int | None = None, head_dim: int | None = None, rope: bool = False,
                 rope_theta: float = 10000.0, qkv_bias: bool = True, proj_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl=None, rngs: nnx.Rngs):
        owner = type(self).__name__
        if self.ndim not in (1, 2, 3):
            raise TypeError(f"{owner}: use NeighborhoodAttention1D, 2D or 3D")
        dim, num_heads = _positive(owner, "dim", dim), _positive(owner, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive(owner, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{owner}: num_kv_heads must divide num_heads; got {num_kv_heads} and {num_heads}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{owner}: num_heads must divide dim when head_dim is not given; got dim={dim}, "
                                 f"num_heads={num_heads}")
            head_dim = dim // num_heads
        head_dim = _positive(owner, "head_dim", head_dim)
        if rope and head_dim % (2 * self.ndim):
            raise ValueError(f"{owner}: axial RoPE needs head_dim divisible by 2·ndim = {2 * self.ndim}; got "
                             f"head_dim={head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"{owner}: rope_theta must be > 0; got {rope_theta!r}")
        self.options = dict(kernel_size=per_dim("kernel_size", kernel_size, self.ndim),
                            dilation=per_dim("dilation", dilation, self.ndim),
                            stride=per_dim("stride", stride, self.ndim),
                            is_causal=per_dim("is_causal", is_causal, self.ndim, bool))
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_theta, self.impl = bool(rope), float(rope_theta), impl
        self.widths = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        self.qkv = nnx.Linear(dim, sum(self.widths), use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(num_heads * head_dim, dim, use_bias=proj_bias, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def _check_x(self, x):
        owner = type(self).__name__
        if jnp.ndim(x) != self.ndim + 2 or jnp.shape(x)[-1] != self.dim:
            axes = ", ".join("XYZ"[: self.ndim])
            raise ValueError(f"{owner}: x must have shape [batch, {axes}, {self.dim}]; got {list(jnp.shape(x))}")
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise ValueError(f"{owner}: x must be a floating array; got {jnp.asarray(x).dtype}")

    def _axial_rope(self, x, grid):
        """Rotate part ``a`` of the head dimension of ``x [B, *grid, H, D]`` by the coordinate along axis ``a``."""
        b, t = x.shape[0], math.prod(grid)
        flat = x.reshape((b, t) + x.shape[-2:])
        coords = jnp.unravel_index(jnp.arange(t, dtype=jnp.int32), grid)
        part = self.head_dim // self.ndim
        rotated = [apply_rope(flat[..., a * part:(a + 1) * part], coords[a], theta=self.rope_theta)
                   for a in range(self.ndim)]
        return jnp.concatenate(rotated, axis=-1).reshape(x.shape)

    def __call__(self, x):
        """x ``[B, *grid, dim]`` -> ``[B, *grid, dim]``."""
        self._check_x(x)
        b, grid = x.shape[0], tuple(x.shape[1:-1])
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = jnp.split(self.qkv(x), [self.widths[0], self.widths[0] + self.widths[1]], axis=-1)
        q = q.reshape((b,) + grid + (hq, d))
        k = k.reshape((b,) + grid + (hkv, d))
        v = v.reshape((b,) + grid + (hkv, d))
        if self.rope:
            q, k = self._axial_rope(q, grid), self._axial_rope(k, grid)
        o = ops.neighborhood_attention(q, k, v, **self.options, impl=self.impl)
        return self.proj(o.reshape((b,) + grid + (hq * d,)))


class NeighborhoodAttention1D(NeighborhoodAttention):
    """Neighborhood attention over sequences ``x [B, X, C]`` (see :class:`NeighborhoodAttention`)."""

    ndim = 1


class NeighborhoodAttention2D(NeighborhoodAttention):
    """Neighborhood attention over images ``x [B, X, Y, C]`` (see :class:`NeighborhoodAttention`)."""

    ndim = 2


class NeighborhoodAttention3D(NeighborhoodAttention):
    """Neighborhood attention over videos / volumes ``x [B, X, Y, Z, C]`` (see :class:`NeighborhoodAttention`)."""

    ndim = 3


# ----------------------------------------------------------------------------- the 1-D LM mixer


def parse_na_arg(arg: str | None) -> tuple[int, int]:
    """``"K"`` or ``"K:D"`` -> (kernel_size, dilation); ValueError otherwise."""
    parts = [] if arg is None else arg.split(":")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"mixer 'na' needs a kernel size and an optional dilation, positive ints (na:K or "
                         f"na:K:D); got {'na' if arg is None else f'na:{arg}'}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 1


def _na_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None) -> Attention:
    kernel, dilation = parse_na_arg(arg)
    return Attention(dims.d_model, dims.num_heads, num_kv_heads=dims.num_kv_heads,
                     mask=ops.CausalNeighborhood(kernel, dilation), rope=True, rope_theta=dims.rope_theta,
                     **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("na", _na_mixer, check_arg=lambda name, arg: parse_na_arg(arg),
               doc="causal 1-D neighborhood attention: the last K keys spaced D apart (na:K or na:K:D)",
               example="8")
