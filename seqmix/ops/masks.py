"""Attention masks as data: predicates on explicit positions that also bound whole blocks.

A mask answers two questions:

* ``allowed(q, kv)``: may query ``i`` attend to key ``j``? ``q`` and ``kv`` are :class:`Coords`
  whose arrays broadcast against each other (e.g. ``[B, Tq, 1]`` against ``[B, 1, S]``).
* ``bounds(q, kv)``: for a block of queries and a block of keys given only as ranges
  (:class:`Span`), is the predicate true *somewhere* (``any``) and is it true *everywhere*
  (``all``)? ``any`` may over-approximate and ``all`` may under-approximate; both are exact for the
  built-in masks on contiguous positions. Block metadata (empty / partial / full) comes from these
  bounds, so a new mask kind gets block skipping by writing ``bounds`` once.

Masks compose with ``&`` and ``|``. Segment ids (packed documents) and padding are not masks: every
implementation ANDs them in (``seg_q[i] == seg_kv[j]`` and ``kv_pos[j] >= 0``).

Positions are FAMILIES.md's: ``kv_pos`` defaults to ``arange(S)`` and ``q_pos`` to
``S - Tq + arange(Tq)`` (bottom-right aligned). ``rel`` is a token's position inside its segment
(its position minus the position of the first token of its run of equal segment ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Coords:
    """Per-token coordinates: ``pos`` (absolute position) and ``rel`` (position inside the segment)."""

    pos: Array
    rel: Array


@dataclasses.dataclass(frozen=True)
class Span:
    """Inclusive ranges of ``pos`` and ``rel`` over a block of tokens."""

    pos_lo: Array
    pos_hi: Array
    rel_lo: Array
    rel_hi: Array


class Mask:
    """Base class. Subclasses implement ``allowed`` and ``bounds``."""

    def allowed(self, q: Coords, kv: Coords) -> Array:
        raise NotImplementedError

    def bounds(self, q: Span, kv: Span) -> tuple[Array, Array]:
        raise NotImplementedError

    def cache_extent(self) -> tuple[int | None, int]:
        """(recent, sinks): every allowed key of a causal query is among its ``recent`` latest keys
        (itself included; None = unbounded) or its segment's first ``sinks`` tokens. Decode caches
        use it to size ring buffers."""
        return None, 0

    def check_positions(self, q_pos_max: int, kv_pos_max: int) -> None:
        """Raise ValueError if the mask cannot describe a call whose positions reach these maxima
        (only position tables such as :class:`Explicit` have a limit)."""

    def __and__(self, other: "Mask") -> "Mask":
        return And(_check_mask(self), _check_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(_check_mask(self), _check_mask(other))


def _check_mask(m) -> Mask:
    if not isinstance(m, Mask):
        raise ValueError(f"masks compose only with masks; got {type(m).__name__}: {m!r}")
    return m


@dataclasses.dataclass(frozen=True)
class And(Mask):
    a: Mask
    b: Mask

    def check_positions(self, q_pos_max, kv_pos_max):
        self.a.check_positions(q_pos_max, kv_pos_max)
        self.b.check_positions(q_pos_max, kv_pos_max)

    def allowed(self, q, kv):
        return self.a.allowed(q, kv) & self.b.allowed(q, kv)

    def bounds(self, q, kv):
        any_a, all_a = self.a.bounds(q, kv)
        any_b, all_b = self.b.bounds(q, kv)
        return any_a & any_b, all_a & all_b

    def cache_extent(self):
        # The intersection fits in either operand's extent: keep the smaller one.
        ea, eb = self.a.cache_extent(), self.b.cache_extent()
        if ea[0] is None:
            return eb
        if eb[0] is None:
            return ea
        return min(ea, eb, key=lambda e: e[0] + e[1])


@dataclasses.dataclass(frozen=True)
class Or(Mask):
    a: Mask
    b: Mask

    def check_positions(self, q_pos_max, kv_pos_max):
        self.a.check_positions(q_pos_max, kv_pos_max)
        self.b.check_positions(q_pos_max, kv_pos_max)

    def allowed(self, q, kv):
        return self.a.allowed(q, kv) | self.b.allowed(q, kv)

    def bounds(self, q, kv):
        any_a, all_a = self.a.bounds(q, kv)
        any_b, all_b = self.b.bounds(q, kv)
        return any_a | any_b, all_a | all_b

    def cache_extent(self):
        (ra, sa), (rb, sb) = self.a.cache_extent(), self.b.cache_extent()
        return (None if ra is None or rb is None else max(ra, rb)), max(sa, sb)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every key is visible."""

    def allowed(self, q, kv):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q.pos), jnp.shape(kv.pos)), bool)

    def bounds(self, q, kv):
        shape = jnp.broadcast_shapes(jnp.shape(q.pos_lo), jnp.shape(kv.pos_lo))
        return jnp.ones(shape, bool), jnp.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """``i - left <= j <= i + right``; ``None`` on a side means unbounded on that side.

    A causal window of ``w`` keys is ``SlidingWindow(w - 1, 0)``; ``Causal()`` is ``(None, 0)``.
    """

    left: int | None
    right: int | None

    def __post_init__(self):
        for name in ("left", "right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, (int, np.integer)) or val < 0):
                raise ValueError(f"SlidingWindow.{name} must be None or an int >= 0; got {val!r}")
        if self.left is not None and self.right is not None and self.left + self.right < 0:
            raise ValueError("SlidingWindow is empty")

    def allowed(self, q, kv):
        d = kv.pos - q.pos
        ok = jnp.ones(jnp.shape(d), bool)
        if self.left is not None:
            ok &= d >= -self.left
        if self.right is not None:
            ok &= d <= self.right
        return ok

    def bounds(self, q, kv):
        d_lo = kv.pos_lo - q.pos_hi  # smallest j - i in the block
        d_hi = kv.pos_hi - q.pos_lo  # largest j - i in the block
        any_ = jnp.ones(jnp.shape(d_lo), bool)
        all_ = jnp.ones(jnp.shape(d_lo), bool)
        if self.left is not None:
            any_ &= d_hi >= -self.left
            all_ &= d_lo >= -self.left
        if self.right is not None:
            any_ &= d_lo <= self.right
            all_ &= d_hi <= self.right
        return any_, all_

    def cache_extent(self):
        return (None if self.left is None else self.left + 1), 0


def Causal() -> SlidingWindow:  # noqa: N802 - reads like a class at call sites
    """``j <= i``."""
    return SlidingWindow(None, 0)


def LocalWindow(window: int) -> SlidingWindow:  # noqa: N802
    """A causal window of ``window`` keys (the query's own key included)."""
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an int >= 1; got {window!r}")
    return SlidingWindow(int(window) - 1, 0)


@dataclasses.dataclass(frozen=True)
class ChunkedCausal(Mask):
    """Llama-4 style: ``floor(i / chunk) == floor(j / chunk) and j <= i``."""

    chunk: int

    def __post_init__(self):
        if not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
            raise ValueError(f"ChunkedCausal.chunk must be an int >= 1; got {self.chunk!r}")

    def allowed(self, q, kv):
        return (q.pos // self.chunk == kv.pos // self.chunk) & (kv.pos <= q.pos)

    def bounds(self, q, kv):
        c = self.chunk
        c_any, c_all = Causal().bounds(q, kv)
        any_ = c_any & (q.pos_lo // c <= kv.pos_hi // c) & (kv.pos_lo // c <= q.pos_hi // c)
        one = (q.pos_lo // c == q.pos_hi // c) & (kv.pos_lo // c == kv.pos_hi // c)
        return any_, c_all & one & (q.pos_lo // c == kv.pos_lo // c)

    def cache_extent(self):
        return self.chunk, 0


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
    """The first ``n`` tokens of each segment (``rel < n``) are visible to every query.

    Compose it: StreamingLLM is ``LocalWindow(w) | (Causal() & Sinks(4))`` (see :func:`streaming`).
    """

    n: int

    def __post_init__(self):
        if not isinstance(self.n, (int, np.integer)) or self.n < 0:
            raise ValueError(f"Sinks.n must be an int >= 0; got {self.n!r}")

    def allowed(self, q, kv):
        return jnp.broadcast_to(kv.rel < self.n, jnp.broadcast_shapes(jnp.shape(q.pos), jnp.shape(kv.rel)))

    def bounds(self, q, kv):
        shape = jnp.broadcast_shapes(jnp.shape(q.pos_lo), jnp.shape(kv.rel_lo))
        return (jnp.broadcast_to(kv.rel_lo < self.n, shape), jnp.broadcast_to(kv.rel_hi < self.n, shape))

    def cache_extent(self):
        return 0, self.n


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
    """Bidirectional inside each segment's first ``prefix`` tokens, causal after."""

    prefix: int

    def __post_init__(self):
        if not isinstance(self.prefix, (int, np.integer)) or self.prefix < 0:
            raise ValueError(f"PrefixLM.prefix must be an int >= 0; got {self.prefix!r}")

    def allowed(self, q, kv):
        return (kv.pos <= q.pos) | ((q.rel < self.prefix) & (kv.rel < self.prefix))

    def bounds(self, q, kv):
        c_any, c_all = Causal().bounds(q, kv)
        p_any = (q.rel_lo < self.prefix) & (kv.rel_lo < self.prefix)
        p_all = (q.rel_hi < self.prefix) & (kv.rel_hi < self.prefix)
        return c_any | p_any, c_all | p_all


@dataclasses.dataclass(frozen=True, eq=False)
class Explicit(Mask):
    """A static boolean matrix indexed by (q position, kv position).

    With the default positions of a self-attention call that is a ``[T, T]`` matrix; with ``Tq < S``
    queries sit at positions ``S - Tq ..  S - 1`` (bottom-right aligned), so the matrix needs ``S`` rows.
    A call whose positions reach past the matrix raises ValueError (when its positions are known, i.e.
    outside jit); a larger matrix is fine (its top-left part is used). Block bounds come from a
    summed-area table, so blocks of a block-sparse pattern are skipped like those of any other mask.
    """

    matrix: np.ndarray

    def __post_init__(self):
        m = np.asarray(self.matrix)
        if m.ndim != 2 or m.dtype != np.bool_:
            raise ValueError(f"Explicit mask must be a boolean [Tq, S] array; got {m.dtype}{list(m.shape)}")
        object.__setattr__(self, "matrix", m)
        sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int32)
        sat[1:, 1:] = m.astype(np.int32).cumsum(0).cumsum(1)
        object.__setattr__(self, "_sat", sat)

    def check_positions(self, q_pos_max, kv_pos_max):
        t, s = self.matrix.shape
        if q_pos_max >= t or kv_pos_max >= s:
            raise ValueError(
                f"Explicit mask of shape {[t, s]} does not cover this call: it needs at least "
                f"{[q_pos_max + 1, kv_pos_max + 1]} (q positions up to {q_pos_max}, kv positions up to "
                f"{kv_pos_max}; queries are bottom-right aligned by default, at S - Tq .. S - 1)")

    def allowed(self, q, kv):
        t, s = self.matrix.shape
        qi, kj = jnp.broadcast_arrays(q.pos, kv.pos)
        inside = (qi >= 0) & (qi < t) & (kj >= 0) & (kj < s)
        return inside & jnp.asarray(self.matrix)[jnp.clip(qi, 0, t - 1), jnp.clip(kj, 0, s - 1)]

    def bounds(self, q, kv):
        t, s = self.matrix.shape
        sat = jnp.asarray(self._sat)
        q0, q1 = jnp.clip(q.pos_lo, 0, t), jnp.clip(q.pos_hi + 1, 0, t)
        k0, k1 = jnp.clip(kv.pos_lo, 0, s), jnp.clip(kv.pos_hi + 1, 0, s)
        q0, q1, k0, k1 = jnp.broadcast_arrays(q0, q1, k0, k1)
        count = sat[q1, k1] - sat[q0, k1] - sat[q1, k0] + sat[q0, k0]
        area = (q.pos_hi - q.pos_lo + 1) * (kv.pos_hi - kv.pos_lo + 1)
        return count > 0, count == area


def streaming(window: int, n_sink: int = 4) -> Mask:
    """StreamingLLM: a causal window of ``window`` keys plus the first ``n_sink`` tokens of the segment."""
    return LocalWindow(window) | (Causal() & Sinks(n_sink))


# ----------------------------------------------------------------------------- lowering helpers


def segment_relative(pos: Array, seg: Array | None) -> Array:
    """``rel`` for each token: ``pos`` minus the position of the first token of its segment run.

    pos: int32 ``[T]``; seg: int32 ``[B, T]`` or None. Returns int32 ``[B, T]`` (``[1, T]`` if None).
    """
    pos = jnp.asarray(pos, jnp.int32)
    if seg is None:
        return pos[None, :]
    t = pos.shape[0]
    idx = jnp.arange(t, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = jax_cummax(jnp.where(start, idx[None, :], 0))
    return pos[None, :] - pos[first]


def jax_cummax(x: Array) -> Array:
    import jax

    return jax.lax.cummax(x, axis=x.ndim - 1)


from seqmix.ops.sparse_masks import PerHead, PowerAttention, duo_attention  # noqa: E402,F401  (needs Mask)
