"""``neighborhood_attention``: NATTEN's 1-D / 2-D / 3-D neighborhood attention, its family record.

``neighborhood_attention(q, k, v, *, kernel_size, dilation=1, stride=1, is_causal=False, scale=None,
return_lse=False, block_q=None, block_kv=None, impl=None)``

q ``[B, X, H, D]``, ``[B, X, Y, H, D]`` or ``[B, X, Y, Z, H, D]``; k, v the same grid with ``Hkv`` heads
(``H % Hkv == 0``: GQA/MQA). Returns o ``[B, *grid, H, Dv]`` in q's dtype (and lse ``[B, H, *grid]`` fp32
with ``return_lse``).

Each query attends to exactly the keys of its NATTEN neighborhood (FAMILIES.md §2.2; the rule is
:class:`seqmix.ops.neighborhood_mask.Neighborhood`). The grid is flattened row-major and each
implementation is the ``attention`` family's implementation of the same name run with that mask
(``reference``: the explicit masked softmax; ``xla`` and ``pallas_tpu``: the block-sparse flash forms,
which skip the blocks the mask's bounds call empty). Decoding (1-D causal, stride 1): ``attention_decode``
with :class:`~seqmix.ops.neighborhood_mask.CausalNeighborhood`, a ring of ``(K − 1)·D + 1`` keys; video
(causal in time, the first axis, stride 1 along it): :func:`neighborhood_decode` a frame at a time, a
ring of ``((K_t − 1)·D_t + 1)`` frames (``cache_size_for(mask, ...)``).
Sequence parallelism (1-D, or along the first spatial axis, which row-major order keeps contiguous): the
softmax strategies ``ring`` and ``allgather`` with the same mask on the flattened tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks, _op_docs, _registry
from seqmix.ops.attention import attention_flops, prepare_attention
from seqmix.ops.attention_call import AttentionCall
from seqmix.ops.neighborhood_mask import neighborhood

FAMILY = "neighborhood_attention"
ATTENTION = "attention"


@dataclasses.dataclass(frozen=True)
class NeighborhoodCall:
    """A validated call: the attention call on the flattened grid, and the grid to restore."""

    attention: AttentionCall  # q [B, T = X·Y·Z, H, D] ...; mask: the Neighborhood
    grid: tuple[int, ...]


def prepare_neighborhood(q, k, v, *, kernel_size, dilation=1, stride=1, is_causal=False, scale=None,
                         return_lse: bool = False, block_q: int | None = None,
                         block_kv: int | None = None) -> NeighborhoodCall:
    """Validate the op's arguments (see the module docstring) into a :class:`NeighborhoodCall`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not 4 <= len(jnp.shape(x)) <= 6:
            raise ValueError(f"neighborhood_attention: {name} must be [B, X, H, D], [B, X, Y, H, D] or "
                             f"[B, X, Y, Z, H, D]; got shape {list(jnp.shape(x))}")
        _checks.require_float(f"neighborhood_attention: {name}", x)
    grid = tuple(q.shape[1:-2])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[:-2]) != (q.shape[0],) + grid:
            raise ValueError(f"neighborhood_attention: {name} must cover q's batch and grid "
                             f"{[q.shape[0], *grid]}; got shape {list(x.shape)}")
    mask = neighborhood(grid, kernel_size, dilation, stride, is_causal)
    b, t = q.shape[0], mask.tokens
    flat = lambda x: x.reshape((b, t) + x.shape[-2:])  # noqa: E731
    call = prepare_attention(flat(q), flat(k), flat(v), mask=mask, scale=scale, return_lse=return_lse,
                             block_q=block_q, block_kv=block_kv)
    return NeighborhoodCall(call, grid)


def _unflatten(call: NeighborhoodCall, out):
    b = call.attention.q.shape[0]
    if not call.attention.return_lse:
        return out.reshape((b,) + call.grid + out.shape[-2:])
    o, lse = out
    return o.reshape((b,) + call.grid + o.shape[-2:]), lse.reshape(lse.shape[:2] + call.grid)


def _on_attention(name: str):
    """The ``attention`` implementation ``name`` as this family's: same fn, supports and evidence."""
    impl = _registry.get_family(ATTENTION).implementations[name]
    return dataclasses.replace(
        impl, fn=lambda call: _unflatten(call, impl.fn(call.attention)),
        supports=lambda call: impl.supports(call.attention),
        describe=None if impl.describe is None else (lambda call: impl.describe(call.attention)))


def neighborhood_inputs(fam, key, *, batch: int = 2, seq: int = 64, heads: int = 4, dk: int = 16, dv: int = 16,
                        dtype=jnp.float32, regime: str = "typical"):
    """Random 1-D inputs ``[B, T, H, D]`` (GQA: ``Hkv = H/2``): kernel 7 (at most T), non-causal;
    "stress": dilation 2, stride 2, causal."""
    hkv = max(1, heads // 2)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, seq, heads, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq, hkv, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq, hkv, dv), jnp.float32).astype(dtype)
    if regime == "typical":
        options = {"kernel_size": min(7, seq)}
    else:
        kernel = max(1, min(7, seq // 2))
        options = {"kernel_size": kernel, "dilation": 2 if seq >= 2 * kernel else 1,
                   "stride": min(2, kernel), "is_causal": True}
    return _registry.Inputs((q, k, v), {}, options)


DOC = _op_docs.compose(
    "Neighborhood attention (NATTEN's rule) over 1-D, 2-D or 3-D token grids: each query attends to the "
    "kernel_size window of keys around it.",
    """
    o_i = Σ_{j ∈ N(i)} softmax_j(scale · q_i·k_j) v_j over the neighborhood N(i) of query i: per spatial
    dimension a window of kernel_size keys centred on the query (shifted, never truncated, at the grid's
    borders), spaced by dilation, shared by groups of stride queries, or ending at the query when that
    dimension is causal. Empty tiles of the pattern are skipped, not computed.
    """,
    {"q": "float ``[B, X, H, D]``, ``[B, X, Y, H, D]`` or ``[B, X, Y, Z, H, D]`` queries on a 1-D, 2-D or 3-D "
          "grid (float32, bfloat16 or float16; q, k, v share one dtype).",
     "k": "keys on the same grid, ``Hkv`` heads dividing ``H`` (GQA/MQA).",
     "v": "values on the same grid, ``[..., Hkv, Dv]``.",
     "kernel_size": "window size per dimension: an int or one int per spatial dimension "
                    "(kernel_size × dilation must not exceed that dimension's size).",
     "dilation": "spacing of the window's keys (int or per dimension; default 1).",
     "stride": "queries per shared window (int or per dimension, at most kernel_size; default 1).",
     "is_causal": "bool or one bool per dimension: the window ends at the query (default False).",
     "scale": "logit scale; default ``1/sqrt(D)``.",
     "return_lse": "also return the fp32 log-sum-exp ``[B, H, *grid]``.",
     "block_q": "query tile of the xla form (a multiple of 8; default: ``seqmix.ops.xla_tiles``' choice).",
     "block_kv": "key tile of the flash forms (a multiple of 8).",
     "impl": "None (automatic), or ``\"reference\"``, ``\"xla\"``, ``\"pallas_tpu\"``."},
    "o ``[B, *grid, H, Dv]`` in q's dtype, or ``(o, lse)`` with ``return_lse``.",
    """
    import jax
    from seqmix import ops
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 4, 32))        # [B, X, Y, H, D]
    o = ops.neighborhood_attention(x, x, x, kernel_size=7)              # 7×7 windows
    o = ops.neighborhood_attention(x, x, x, kernel_size=(3, 5), dilation=(1, 2), is_causal=(True, False))
    """)


def neighborhood_flops(call: NeighborhoodCall) -> float:
    """Useful forward FLOPs: attention's count on the flattened call (allowed pairs only)."""
    return attention_flops(call.attention)


_PORTABLE = ("reference", "xla")  # define_family registers these two; the kernels keep their own evidence
_KERNELS = tuple(_on_attention(n) for n, impl in _registry.get_family(ATTENTION).implementations.items()
                 if n not in _PORTABLE and impl.any_mask)


def neighborhood_decode(q, k, v, cache, *, mask, scale=None, impl=None):
    """Append whole frames of a video (or any grid causal along its first axis) and attend from them.

    q ``[B, n, *frame, H, D]`` (``n`` frames, usually 1), k/v ``[B, n, *frame, Hkv, ·]``; mask: the
    :func:`~seqmix.ops.neighborhood_mask.neighborhood` of the whole video, shape ``(max_frames, *frame)``,
    ``is_causal[0]`` true and ``stride[0] == 1``; cache: ``init_kv_cache`` sized by ``cache_size_for(mask,
    mask.tokens)`` (a ring of the time window's frames). Returns ``(o [B, n, *frame, H, Dv], cache)``, equal
    to the parallel op's rows for these frames. Frames go in whole: later tokens of a frame are neighbours
    of earlier ones along the non-causal axes."""
    from seqmix.ops.attention import attention_decode
    from seqmix.ops.neighborhood_mask import Neighborhood

    if not isinstance(mask, Neighborhood) or not mask.is_causal[0] or mask.stride[0] != 1:
        raise ValueError("neighborhood_decode: mask must be a neighborhood(...) causal along its first axis "
                         f"with stride 1 there; got {mask!r}")
    frame = mask.shape[1:]
    b, n = q.shape[:2]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != len(mask.shape) + 3 or tuple(x.shape[2:-2]) != frame or x.shape[:2] != (b, n):
            raise ValueError(f"neighborhood_decode: {name} must be [B, frames, {', '.join(map(str, frame))}, heads, "
                             f"dim] like q; got {list(x.shape)}")
    size = int(np.prod(frame, dtype=np.int64))
    if _checks.is_concrete(cache.next_pos) and int(cache.next_pos) % size:
        raise ValueError(f"neighborhood_decode: the cache holds {int(cache.next_pos)} tokens, not whole frames of "
                         f"{size}")
    flat = lambda x: x.reshape(b, n * size, *x.shape[-2:])  # noqa: E731
    o, cache = attention_decode(flat(q), flat(k), flat(v), cache, mask=mask, scale=scale, impl=impl)
    return o.reshape(b, n, *frame, *o.shape[-2:]), cache


neighborhood_attention = _registry.define_family(
    FAMILY, kind="softmax", prepare=prepare_neighborhood, doc=DOC,
    summary="Neighborhood attention (NATTEN semantics) on 1-D/2-D/3-D grids: kernel, dilation, stride, causal per dimension.",
    reference=_on_attention("reference").fn, xla=_on_attention("xla").fn,
    describe=_on_attention("xla").describe, kernels=_KERNELS,
    args=tuple(_registry.ArgSpec(n, "option", example=e) for n, e in
               (("kernel_size", 7), ("dilation", 1), ("stride", 1), ("is_causal", False))),
    decode_doc="1-D causal: attention_decode with CausalNeighborhood; causal in time (video): neighborhood_decode "
               "a frame at a time",
    sequence_parallel=("ring", "allgather"),
    modules=("seqmix.nn.NeighborhoodAttention1D", "seqmix.nn.NeighborhoodAttention2D",
             "seqmix.nn.NeighborhoodAttention3D"),
    mixers={"na": "seqmix.nn.neighborhood"},
    make_inputs=neighborhood_inputs, flops=neighborhood_flops)
