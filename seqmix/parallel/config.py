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
* recurrent layers: ``recurrent_strategy`` in ``"lasp2" | "lasp1"`` (contiguous layout: a recurrence
  needs its tokens in order).

``SequenceParallel`` is a frozen, hashable dataclass (it lives in the NNX graph definition, a jit
cache key); it is not serializable (a mesh holds devices), so ``LMConfig`` never holds one: pass it
to ``LM(config, rngs=..., sequence_parallel=sp)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS

from seqmix.ops import masks as masks_lib
from seqmix.parallel import layout as layout_lib
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel._common import mask_uses_rel

SOFTMAX_STRATEGY_NAMES = ("allgather", "ring", "ulysses")
RECURRENT_STRATEGY_NAMES = ("lasp2", "lasp1")
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

    def _bax(self, b: int):
        from seqmix.parallel import _batch_axes

        return _batch_axes(self.mesh, self.axis, self.batch_axes, b)

    # ------------------------------------------------------------------ softmax layers

    def attention(self, q, k, v, *, positions, segment_ids=None, mask=None, sink_logits=None, soft_cap=None,
                  scale=None, impl=None):
        """Self-attention on global q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, ·]`` with global ``positions``
        int ``[T]`` (the mask reads them); same result as ``seqmix.ops.attention(q, k, v,
        q_positions=positions, kv_positions=positions, segment_ids=...)``."""
        from seqmix.parallel import SOFTMAX_STRATEGIES

        fn = SOFTMAX_STRATEGIES[self.strategy]
        mask = masks_lib.Full() if mask is None else mask
        b, t = q.shape[:2]
        self.check_seq_len(t, "attention: sequence")
        perm = layout_lib.permutation(self.layout, t, self.size)
        ident = self.layout is None
        pi = layout_lib.permute_inputs(perm, segment_ids=segment_ids, positions=positions,
                                       **({} if ident else {"q": q, "k": k, "v": v}))
        if not ident:
            q, k, v = pi["q"], pi["k"], pi["v"]
        bax = self._bax(b)
        x_spec = PS(bax, self.axis)
        args = {"q": q, "k": k, "v": v, "q_positions": pi["positions"]}
        specs = {"q": x_spec, "k": x_spec, "v": x_spec, "q_positions": PS(self.axis)}
        if pi["segment_ids"] is not None:
            args["segment_ids"], specs["segment_ids"] = pi["segment_ids"], x_spec
        if mask_uses_rel(mask):
            rel = jnp.broadcast_to(pi["relative_positions"], (b, t))
            args["relative_positions"], specs["relative_positions"] = (rel, rel), (x_spec, x_spec)
        if sink_logits is not None:
            args["sink_logits"], specs["sink_logits"] = sink_logits, PS()
        axis = self.axis

        def local(kw):
            kw = dict(kw)
            kw["kv_positions"] = kw["q_positions"]
            return fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), axis_name=axis, mask=mask, soft_cap=soft_cap,
                      scale=scale, impl=impl, **kw)

        out = jax.shard_map(local, mesh=self.mesh, in_specs=(specs,), out_specs=x_spec, check_vma=False)(args)
        return out if ident else layout_lib.unpermute(out, perm)

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
