"""``neighborhood_attention``: NATTEN's 1-D / 2-D / 3-D neighborhood attention on the ``attention`` op.

``neighborhood_attention(q, k, v, *, kernel_size, dilation=1, stride=1, is_causal=False, scale=None,
return_lse=False, impl=None, block_q=128, block_kv=128)``

q ``[B, X, H, D]``, ``[B, X, Y, H, D]`` or ``[B, X, Y, Z, H, D]``; k, v the same grid with ``Hkv`` heads
(``H % Hkv == 0``: GQA/MQA). ``kernel_size``, ``dilation``, ``stride`` (ints) and ``is_causal`` (bools) are one
value for every spatial dimension or a per-dimension tuple. Returns o ``[B, *grid, H, Dv]`` in q's dtype (and
lse ``[B, H, *grid]`` fp32 with ``return_lse``).

Each query attends to exactly the keys of its NATTEN neighborhood (FAMILIES.md §2.2; the mask rule is
:class:`seqmix.ops.neighborhood_mask.Neighborhood`): the grid is flattened row-major and ``attention`` runs
with that mask, so every attention implementation (``reference``, ``xla``, the Pallas kernels) serves it and
skips the blocks the mask bounds call empty. ``impl`` and the block sizes are passed to ``attention``.

Example::

    x = jnp.ones((1, 16, 16, 4, 32))
    o = neighborhood_attention(x, x, x, kernel_size=7)                      # 2-D, 7×7 windows
    o = neighborhood_attention(x, x, x, kernel_size=(3, 5), dilation=(1, 2), is_causal=(True, False))
"""

from __future__ import annotations

from seqmix.ops import _checks
from seqmix.ops.attention import attention
from seqmix.ops.neighborhood_mask import neighborhood


def neighborhood_attention(q, k, v, *, kernel_size, dilation=1, stride=1, is_causal=False, scale=None,
                           return_lse: bool = False, impl=None, block_q: int = 128, block_kv: int = 128):
    """Neighborhood attention over a 1-D/2-D/3-D grid (see the module docstring for shapes and options)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not 4 <= len(x.shape) <= 6:
            raise ValueError(f"neighborhood_attention: {name} must be [B, X, H, D], [B, X, Y, H, D] or "
                             f"[B, X, Y, Z, H, D]; got shape {list(x.shape)}")
        _checks.require_float(f"neighborhood_attention: {name}", x)
    grid = tuple(q.shape[1:-2])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[:-2]) != (q.shape[0],) + grid:
            raise ValueError(f"neighborhood_attention: {name} must cover q's batch and grid "
                             f"{[q.shape[0], *grid]}; got shape {list(x.shape)}")
    mask = neighborhood(grid, kernel_size, dilation, stride, is_causal)
    b, t = q.shape[0], mask.tokens
    flat = lambda x: x.reshape((b, t) + x.shape[-2:])  # noqa: E731
    out = attention(flat(q), flat(k), flat(v), mask=mask, scale=scale, return_lse=return_lse, impl=impl,
                    block_q=block_q, block_kv=block_kv)
    o, lse = out if return_lse else (out, None)
    o = o.reshape((b,) + grid + o.shape[-2:])
    return (o, lse.reshape(lse.shape[:2] + grid)) if return_lse else o
