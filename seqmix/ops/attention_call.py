"""The validated call of the softmax family: :class:`AttentionCall` and ``prepare_attention``.

Shared by every ``attention`` implementation (reference, XLA, TPU kernels) and by the decode path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks
from seqmix.ops import masks as masks_lib
from seqmix.ops import xla_tiles

Array = Any


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A validated attention call. Arrays are at the API layout; integer metadata is int32."""

    q: Array  # [B, Tq, Hq, D]
    k: Array  # [B, S, Hkv, D]
    v: Array  # [B, S, Hkv, Dv]
    mask: masks_lib.Mask
    q_pos: Array  # [Tq]
    kv_pos: Array  # [S]; negative = no key here (padding, empty cache slot)
    q_rel: Array  # [B or 1, Tq]
    kv_rel: Array  # [B or 1, S]
    q_seg: Array | None  # [B, Tq]
    kv_seg: Array | None  # [B, S]
    scale: float
    sink_logits: Array | None  # [Hq]
    soft_cap: float | None
    return_lse: bool
    block_q: int
    block_kv: int
    # True when no positions were passed (kv 0..S-1, queries bottom-right aligned, relative positions
    # from the segments): implementations that take no positions (cuDNN) can serve only such calls.
    default_positions: bool = False

    @property
    def groups(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


def _default_block(length: int, preferred: int) -> int:
    return min(preferred, max(8, -(-length // 8) * 8))


def prepare_attention(q, k, v, *, mask=None, segment_ids=None, scale=None, sink_logits=None,
                      soft_cap=None, return_lse=False, q_positions=None, kv_positions=None,
                      relative_positions=None, block_q=None, block_kv=None) -> AttentionCall:
    """Validate ``attention``'s arguments (see the module docstring) into an :class:`AttentionCall`.

    Extra keywords: ``q_positions [Tq]`` / ``kv_positions [S]`` (int32, default bottom-right aligned;
    a negative kv position marks a missing key), ``relative_positions = (q_rel, kv_rel)`` (positions
    inside segments, normally derived from ``segment_ids``), ``block_q`` / ``block_kv`` (XLA tiles; None:
    :func:`seqmix.ops.xla_tiles.choose` picks them for the platform, mask and lengths).
    ``segment_ids`` is ``[B, T]`` for self-attention or a pair ``(q_seg [B, Tq], kv_seg [B, S])``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.require_rank(name, x, 4, "[batch, seq, heads, head_dim]")
        _checks.require_float(name, x)
    _checks.require_same_dtype(q=q, k=k, v=v)
    b, tq, hq, d = q.shape
    _, s, hkv, _ = k.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"q, k, v must share the batch size; got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim must equal q head_dim {d}; got k {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [batch, seq, heads] = {list(k.shape[:3])}; got v {list(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"kv heads ({hkv}) must divide q heads ({hq}) for GQA/MQA; got q {list(q.shape)}, k {list(k.shape)}")
    if tq == 0 or s == 0:
        raise ValueError(f"sequence lengths must be >= 1; got Tq={tq}, S={s}")
    if mask is None:
        mask = masks_lib.Full()
    if not isinstance(mask, masks_lib.Mask):
        raise ValueError(f"mask must be a seqmix.ops.masks.Mask or None; got {type(mask).__name__}")
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    soft_cap = _checks.require_positive("soft_cap", soft_cap)
    if sink_logits is not None:
        _checks.require_float("sink_logits", sink_logits)
        _checks.require_shape("sink_logits", sink_logits, (hq,), "[q_heads]")
    q_positions_given, kv_positions_given = q_positions is not None, kv_positions is not None
    relative_given = relative_positions is not None
    if q_positions is None:
        q_positions = s - tq + jnp.arange(tq, dtype=jnp.int32)
    if kv_positions is None:
        kv_positions = jnp.arange(s, dtype=jnp.int32)
    q_pos = _checks.require_int_array("q_positions", q_positions, (tq,), "[q_seq]")
    kv_pos = _checks.require_int_array("kv_positions", kv_positions, (s,), "[kv_seq]")
    if _checks.is_concrete(q_pos) and _checks.is_concrete(kv_pos):
        # numpy: a jnp reduction would be traced inside a caller's jit
        mask.check_positions(int(np.max(np.asarray(q_pos))), int(np.max(np.asarray(kv_pos))))
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be [B, T] or a pair (q_segment_ids, kv_segment_ids)")
            q_seg = _checks.require_int_array("segment_ids[0]", segment_ids[0], (b, tq), "[batch, q_seq]")
            kv_seg = _checks.require_int_array("segment_ids[1]", segment_ids[1], (b, s), "[batch, kv_seq]")
        else:
            if tq != s:
                raise ValueError(f"a single segment_ids array needs Tq == S (self-attention); got Tq={tq}, S={s}: pass (q_seg, kv_seg)")
            q_seg = kv_seg = _checks.require_int_array("segment_ids", segment_ids, (b, tq), "[batch, seq]")
    if relative_positions is None:
        q_rel = masks_lib.segment_relative(q_pos, q_seg)
        kv_rel = masks_lib.segment_relative(kv_pos, kv_seg)
    else:
        if not isinstance(relative_positions, (tuple, list)) or len(relative_positions) != 2:
            raise ValueError("relative_positions must be a pair (q_rel [B or 1, Tq], kv_rel [B or 1, S])")
        q_rel = _checks.require_int_array("relative_positions[0]", relative_positions[0],
                                          (jnp.shape(relative_positions[0])[0], tq), "[batch or 1, q_seq]")
        kv_rel = _checks.require_int_array("relative_positions[1]", relative_positions[1],
                                           (jnp.shape(relative_positions[1])[0], s), "[batch or 1, kv_seq]")
    if block_q is None or block_kv is None:
        chosen = xla_tiles.choose(mask, tq, s, b * hq)
        block_q = chosen[0] if block_q is None else block_q
        block_kv = chosen[1] if block_kv is None else block_kv
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(val, int) or val < 1 or val % 8:
            raise ValueError(f"{name} must be a positive multiple of 8; got {val!r}")
    return AttentionCall(q, k, v, mask, q_pos, kv_pos, q_rel, kv_rel, q_seg, kv_seg, scale,
                         sink_logits, soft_cap, bool(return_lse), _default_block(tq, block_q),
                         _default_block(s, block_kv),
                         default_positions=not (q_positions_given or kv_positions_given or relative_given))


def finish(call: AttentionCall, o, lse):
    return (o, lse) if call.return_lse else o
