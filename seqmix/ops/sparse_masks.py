"""Static sparse attention patterns as masks (re-exported by :mod:`seqmix.ops.masks`).

``PowerAttention`` (Chen et al., "PowerAttention: Exponentially Scaling of Receptive Fields for
Effective Sparse Attention", arXiv 2503.03588): causal attention on blocks of ``block_size`` tokens in
which a query's block sees the key blocks at a distance that is a power of two (1, 2, 4, 8, ...), its
own block and the ``window_blocks − 1`` blocks before it, and the document's first ``sink_blocks``
blocks. A token reaches any earlier token in ``O(log n)`` layers (the receptive field doubles with
each layer, where a sliding window's grows by one window) at ``O(log n)`` blocks per query.

Blocks count from each document's first token (``rel // block_size``, like :class:`~seqmix.ops.masks.Sinks`),
so a packed document sees the pattern it would see alone. As masks they run in every attention
implementation, ring attention and decoding, and their block metadata skips the empty tiles.

``PerHead`` assigns each kv head one of a few masks (``duo_attention``: DuoAttention's, Xiao et al.,
arXiv 2410.10819, full causal *retrieval* heads and sinks + window *streaming* heads in one layer).
It is not a single mask: :mod:`seqmix.ops.per_head` runs each group of heads as an ordinary call with
its mask, and its decode cache keeps the full history only for the heads whose mask needs it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops.masks import Causal, Mask, streaming


def _is_power_of_two(d):
    return (d >= 1) & ((d & (d - 1)) == 0)


def _floor_power_of_two(d):
    """The largest power of two ``<= d`` for int ``d >= 1`` (garbage for ``d < 1``: callers mask it)."""
    d = jnp.maximum(jnp.asarray(d, jnp.int32), 1)
    return jnp.left_shift(jnp.int32(1), 31 - jax.lax.clz(d))


def _positive_int(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class PowerAttention(Mask):
    """Causal; key ``j`` is visible to query ``i`` (same document, ``d = i // B − j // B`` on in-document
    positions, ``B = block_size``) when ``d < window_blocks``, ``d`` is a power of two, or ``j``'s block
    is one of the first ``sink_blocks``. ``block_size=1`` is the token-level pattern."""

    block_size: int
    window_blocks: int = 1
    sink_blocks: int = 1

    def __post_init__(self):
        _positive_int("PowerAttention", "block_size", self.block_size, 1)
        _positive_int("PowerAttention", "window_blocks", self.window_blocks, 1)
        _positive_int("PowerAttention", "sink_blocks", self.sink_blocks, 0)

    def _pattern(self, d, kv_block):
        return (d < self.window_blocks) | _is_power_of_two(d) | (kv_block < self.sink_blocks)

    def allowed(self, q, kv):
        b = self.block_size
        d = q.rel // b - kv.rel // b
        return Causal().allowed(q, kv) & self._pattern(d, kv.rel // b)

    def bounds(self, q, kv):
        b, w, n_sink = self.block_size, self.window_blocks, self.sink_blocks
        q_lo, q_hi, k_lo, k_hi = q.rel_lo // b, q.rel_hi // b, kv.rel_lo // b, kv.rel_hi // b
        d_lo, d_hi = q_lo - k_hi, q_hi - k_lo  # every block distance of the pair of spans lies in between
        c_any, c_all = Causal().bounds(q, kv)
        window_any = (d_lo < w) & (d_hi >= 0)
        power_any = (d_hi >= 1) & (_floor_power_of_two(d_hi) >= jnp.maximum(d_lo, 1))
        any_ = c_any & (window_any | power_any | (k_lo < n_sink))
        all_ = c_all & ((d_hi < w) | (k_hi < n_sink) | ((d_lo == d_hi) & _is_power_of_two(d_lo)))
        return any_, all_


@dataclasses.dataclass(frozen=True)
class PerHead:
    """Kv head ``h`` (with its query heads) attends under ``masks[index[h]]``.

    masks: a tuple of :class:`~seqmix.ops.masks.Mask`; index: one int per kv head into ``masks``."""

    masks: tuple
    index: tuple

    def __post_init__(self):
        masks, index = tuple(self.masks), tuple(self.index)
        if not masks or not all(isinstance(m, Mask) for m in masks):
            raise ValueError(f"PerHead.masks must be a non-empty tuple of masks; got {self.masks!r}")
        if not index or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < len(masks)
                                for i in index):
            raise ValueError(f"PerHead.index must be one int in [0, {len(masks)}) per kv head; got {self.index!r}")
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "index", tuple(int(i) for i in index))

    def groups(self) -> list[tuple[Mask, np.ndarray]]:
        """``(mask, kv heads int [n])`` for every mask some head uses, in ``masks`` order."""
        index = np.asarray(self.index)
        return [(m, np.flatnonzero(index == i)) for i, m in enumerate(self.masks) if (index == i).any()]


def duo_attention(retrieval, *, window: int, n_sink: int = 4) -> PerHead:
    """DuoAttention's heads: ``retrieval[h]`` true -> kv head ``h`` is causal over everything; false ->
    a streaming head (the last ``window`` keys and the document's first ``n_sink``; :func:`~seqmix.ops.masks.streaming`)."""
    flags = tuple(retrieval)
    if not flags or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValueError(f"duo_attention: retrieval must be one bool per kv head; got {retrieval!r}")
    return PerHead((Causal(), streaming(window, n_sink)), tuple(0 if f else 1 for f in flags))
