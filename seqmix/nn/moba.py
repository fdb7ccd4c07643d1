"""``MoBAAttention``: the :class:`~seqmix.nn.attention.Attention` layer with MoBA's block selection, and
the ``moba:B:K`` mixer.

Same projections, GQA, qk-norm, RoPE and short convs as ``Attention``; the op is ``seqmix.ops.moba``
(causal; packed documents by ``segment_ids``). ``full_attention=True`` makes the layer plain causal
attention (MoBA's recipe keeps the last layers full), with the same parameters, so a checkpoint can
switch per layer. Decoding: ``init_cache`` gives an ``ops.MoBACache`` (every key plus the running block
sums); one document per row. ``sequence_parallel``: all-gather KV on contiguous shards (the strategy
MoBA's family record names; another strategy or a layout is a ValueError when the layer is built).
"""

from __future__ import annotations

from flax import nnx

from seqmix import ops
from seqmix.nn.attention import Attention, _positive_int
from seqmix.nn.mixer import register_mixer
from seqmix.ops import masks as masks_lib


class MoBAAttention(Attention):
    """Causal self-attention over each query's own block and its ``topk − 1`` gated past blocks.

    Args (besides :class:`~seqmix.nn.attention.Attention`'s, without ``mask``, ``sink_logits``, ``soft_cap``):
      block_size: keys per block; topk: blocks per query, its own included.
      full_attention: run causal softmax attention instead (same parameters).
    """

    def __init__(self, d_model: int, num_heads: int, *, block_size: int, topk: int, full_attention: bool = False,
                 rngs: nnx.Rngs, **kwargs):
        for name in ("mask", "sink_logits", "soft_cap"):
            if name in kwargs:
                raise ValueError(f"MoBAAttention: {name} is not an option (MoBA is causal, without sinks or caps)")
        super().__init__(d_model, num_heads, mask=masks_lib.Causal(), rngs=rngs, **kwargs)
        self.block_size = _positive_int("block_size", block_size)
        self.topk = _positive_int("topk", topk)
        self.full_attention = bool(full_attention)
        if self.sequence_parallel is not None and not self.full_attention:
            self.sequence_parallel.check_family("moba")
        if not self.full_attention:
            self._kv_type = ops.MoBACache

    def _attend(self, q, k, v, positions, segment_ids):
        if self.full_attention:
            return super()._attend(q, k, v, positions, segment_ids)
        kw = dict(block_size=self.block_size, topk=self.topk, segment_ids=segment_ids, impl=self.impl)
        if self.sequence_parallel is not None:  # positions are arange(T): MoBA's blocks are text positions
            return self.sequence_parallel.family_op("moba", q, k, v, **kw)
        return ops.moba(q, k, v, **kw)

    def _init_kv(self, batch: int, max_len: int, dtype):
        if self.full_attention:
            return super()._init_kv(batch, max_len, dtype)
        return ops.init_moba_cache(batch, self.num_kv_heads, self.head_dim, max_len=max_len,
                                   block_size=self.block_size, dtype=dtype)

    def _attend_decode(self, q, k, v, kv, segment_ids):
        if self.full_attention:
            return super()._attend_decode(q, k, v, kv, segment_ids)
        if segment_ids is not None:
            raise NotImplementedError("MoBAAttention.decode: packed decoding (segment_ids) is not supported; "
                                      "decode one document per row")
        return ops.moba_decode(q, k, v, kv, topk=self.topk)


def parse_moba_arg(arg: str | None) -> tuple[int, int]:
    """``"B:K"`` -> (block_size, topk); ValueError otherwise."""
    parts = [] if arg is None else arg.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"mixer 'moba' needs a block size and a top-k, positive ints (moba:B:K); got "
                         f"{'moba' if arg is None else f'moba:{arg}'}")
    return int(parts[0]), int(parts[1])


def _moba_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None) -> MoBAAttention:
    block_size, topk = parse_moba_arg(arg)
    return MoBAAttention(dims.d_model, dims.num_heads, block_size=block_size, topk=topk,
                         num_kv_heads=dims.num_kv_heads, rope=True, rope_theta=dims.rope_theta,
                         **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("moba", _moba_mixer, check_arg=lambda name, arg: parse_moba_arg(arg),
               doc="MoBA: causal attention over the own block and the top K − 1 gated blocks of B keys (moba:B:K)",
               example="8:2")
