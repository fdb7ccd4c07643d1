"""``SequenceParallel``: the setting that turns a Flax model sequence-parallel (DESIGN.md §6).

A layer built with ``sequence_parallel=SequenceParallel(mesh)`` takes and returns **global** arrays
(``[B, T, d_model]``) exactly like its single-device form; around its one op call it runs the strategy
under ``jax.shard_map`` over ``mesh`` axis ``axis`` (batch over the mesh's data/fsdp axes of size > 1).
Projections, RoPE, short convolutions and gates stay outside the ``shard_map`` on global arrays (XLA
partitions them along the sequence), so positions are global and every mask is evaluated on global
positions.

* softmax layers (``Attention``, Based's window branch): ``strategy`` in ``"allgather" | "ring" |
  "ulysses"`` (default ``"allgather"``: with ``recurrent_strategy="lasp2"`` that is LASP-2H, one
  all-gather per layer); ``layout`` (``None | "zigzag" | "striped"``) is a per-layer permutation of the
  softmax layers' q/k/v, positions and segment ids, undone on the output;
* layers of a family with its own strategy functions (``MoBAAttention``): ``strategy`` must be one its
  record lists, on the contiguous layout (:meth:`SequenceParallel.family_op`);
* recurrent layers: ``recurrent_strategy`` in ``"lasp2" | "lasp1"`` (contiguous layout: a recurrence
  needs its tokens in order).

``SequenceParallel`` is a frozen, hashable dataclass (it lives in the NNX graph definition, a jit
cache key); it is not serializable (a mesh holds devices), so ``LMConfig`` never holds one: pass it
to ``LM(config, rngs=..., sequence_parallel=sp)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from seqmix.parallel import layout as layout_lib
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel.strategies import RECURRENT_STRATEGY_NAMES, SOFTMAX_STRATEGY_NAMES

LAYOUT_NAMES = (None, "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Sequence parallelism of a model's mixers over ``mesh`` axis ``axis``.

    Args:
      mesh: a ``jax.sharding.Mesh`` holding ``axis`` (e.g. from :func:`seqmix.parallel.make_mesh`).
      axis: the sequence axis name (default ``"seq"``).
      strategy: softmax layers' strategy: ``"allgather"`` (default), ``"ring"`` or ``"ulysses"``.
      recurrent_strategy: recurrent layers' strategy: ``"lasp2"`` (default) or ``"lasp1"``.
      layout: ``None`` (contiguous), ``"zigzag"`` or ``"striped"`` (softmax layers only).
      batch_axes: mesh axes the batch is sharded over; ``"auto"``: the data/fsdp axes of size > 1.
    """

    mesh: Mesh
    axis: str = "seq"
    strategy: str = "allgather"
    recurrent_strategy: str = "lasp2"
    layout: str | None = None
    batch_axes: Any = "auto"

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"SequenceParallel: mesh must be a jax.sharding.Mesh; got {type(self.mesh).__name__}")
        mesh_lib.axis_size(self.mesh, self.axis)  # raises for a missing axis
        if self.strategy not in SOFTMAX_STRATEGY_NAMES:
            raise ValueError(f"SequenceParallel: strategy must be one of {list(SOFTMAX_STRATEGY_NAMES)}; "
                             f"got {self.strategy!r}")
        if self.recurrent_strategy not in RECURRENT_STRATEGY_NAMES:
            raise ValueError(f"SequenceParallel: recurrent_strategy must be one of "
                             f"{list(RECURRENT_STRATEGY_NAMES)}; got {self.recurrent_strategy!r}")
        if self.layout not in LAYOUT_NAMES:
            raise ValueError(f"SequenceParallel: layout must be one of {list(LAYOUT_NAMES)}; got {self.layout!r}")
        if isinstance(self.batch_axes, list):
            object.__setattr__(self, "batch_axes", tuple(self.batch_axes))

    @property
    def size(self) -> int:
        """Number of shards of the sequence (the size of ``axis``)."""
        return mesh_lib.axis_size(self.mesh, self.axis)

    def check_seq_len(self, seq_len: int, what: str = "sequence") -> None:
        """Raise ValueError unless ``seq_len`` splits over the axis (and, with a layout, its stronger
        condition: zigzag needs a multiple of ``2 · size``)."""
        p = self.size
        if seq_len % p:
            raise ValueError(f"{what} length {seq_len} must be divisible by the '{self.axis}' mesh axis size {p} "
                             f"(sequence parallelism splits it into {p} equal shards)")
        if self.layout is not None:
            layout_lib.permutation(self.layout, seq_len, p)  # raises with the layout's condition

    # ------------------------------------------------------------------ softmax layers

    def attention(self, q, k, v, *, positions, segment_ids=None, mask=None, sink_logits=None, soft_cap=None,
                  scale=None, impl=None):
        """Self-attention on global q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, ·]`` with global ``positions``
        int ``[T]`` (the mask reads them); same result as ``seqmix.ops.attention(q, k, v,
        q_positions=positions, kv_positions=positions, segment_ids=...)``."""
        from seqmix.parallel import sequence_parallel_attention

        self.check_seq_len(q.shape[1], "attention: sequence")
        return sequence_parallel_attention(q, k, v, mesh=self.mesh, axis=self.axis, strategy=self.strategy,
                                           layout=self.layout, mask=mask, segment_ids=segment_ids,
                                           positions=positions, sink_logits=sink_logits, soft_cap=soft_cap,
                                           scale=scale, impl=impl, batch_axes=self.batch_axes)

    def family_op(self, family: str, q, k, v, *, segment_ids=None, **kwargs):
        """A family with its own strategy functions (its record's ``sp_functions``, e.g. ``moba``) on global
        q/k/v ``[B, T, H, ·]``, by ``strategy`` over contiguous shards; returns o ``[B, T, Hq, Dv]``."""
        from seqmix.parallel import sequence_parallel_family

        self.check_family(family)
        _check_div(q.shape[1], self.size, self.axis, family)
        return sequence_parallel_family(family, q, k, v, mesh=self.mesh, axis=self.axis, strategy=self.strategy,
                                        segment_ids=segment_ids, batch_axes=self.batch_axes, **kwargs)

    def check_family(self, family: str) -> None:
        """ValueError unless ``family``'s record lists this ``strategy`` and the layout is contiguous
        (a layer calls it when built, so a bad setting fails before any data)."""
        from seqmix.ops._registry import get_family

        served = get_family(family).sequence_parallel
        if self.strategy not in served:
            raise ValueError(f"SequenceParallel: {family} layers run by strategies {list(served)}; "
                             f"got strategy={self.strategy!r}")
        if self.layout is not None:
            raise ValueError(f"SequenceParallel: {family} layers need the contiguous layout (its strategy "
                             f"reads whole blocks in order); got layout={self.layout!r}")

    # ------------------------------------------------------------------ recurrent layers

    def recurrent(self, family: str, q, k, v, *args, segment_ids=None, impl=None, **kwargs):
        """A recurrent family's op on global arrays (``args``: the op's positional arrays after q, k, v,
        in the family's order), by ``recurrent_strategy``; returns the output ``[B, T, H, Dv]``."""
        from seqmix.parallel import sequence_parallel_recurrent

        _check_div(q.shape[1], self.size, self.axis, family)  # a recurrence keeps the contiguous layout
        return sequence_parallel_recurrent(family, q, k, v, *args, mesh=self.mesh, axis=self.axis,
                                           strategy=self.recurrent_strategy, segment_ids=segment_ids, impl=impl,
                                           batch_axes=self.batch_axes, **kwargs)


def _check_div(n: int, p: int, axis: str, what: str) -> None:
    if n % p:
        raise ValueError(f"{what}: sequence length {n} must be divisible by the '{axis}' mesh axis size {p}")


def check_sequence_parallel(value, owner: str):
    """``value`` if it is None or a :class:`SequenceParallel`; otherwise a clear ValueError."""
    if value is not None and not isinstance(value, SequenceParallel):
        raise ValueError(f"{owner}: sequence_parallel must be a seqmix.parallel.SequenceParallel or None; "
                         f"got {type(value).__name__}")
    return value


__all__ = ["LAYOUT_NAMES", "RECURRENT_STRATEGY_NAMES", "SOFTMAX_STRATEGY_NAMES", "SequenceParallel",
           "check_sequence_parallel"]
