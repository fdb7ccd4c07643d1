"""``RecurrentCache``: what a recurrent layer carries between decode calls (a pytree).

* ``state``: fp32 ``[B, H, Dk', Dv']``, the op's ``final_state`` (the linear-attention normalizer rides
  along as an extra value column, see ``seqmix.ops.linear_attention``);
* ``conv``: one :class:`~seqmix.nn.short_conv.ConvCache` per short convolution (a tuple, maybe empty);
* ``seg_id``: int32 ``[B]``, the segment of the last token fed (``-1`` before the first), so a decode
  call whose first token starts a new segment resets the state;
* ``next_pos``: int32 ``[]``, the text position of the next token (RoPE in Retention).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqmix.nn.short_conv import ConvCache

Array = Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state", "conv", "seg_id", "next_pos"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """State, short-conv caches, last segment id and next position of one recurrent layer."""

    state: Array
    conv: tuple[ConvCache, ...]
    seg_id: Array
    next_pos: Array

    def replace(self, **changes) -> "RecurrentCache":
        return dataclasses.replace(self, **changes)


def init_recurrent_cache(batch: int, heads: int, dk: int, dv: int, conv: tuple = ()) -> RecurrentCache:
    """Zero state ``[batch, heads, dk, dv]`` (fp32), the given conv caches, ``seg_id = -1``, position 0."""
    return RecurrentCache(state=jnp.zeros((batch, heads, dk, dv), jnp.float32), conv=tuple(conv),
                          seg_id=jnp.full((batch,), -1, jnp.int32), next_pos=jnp.zeros((), jnp.int32))


def decode_segments(cache: RecurrentCache, batch: int, t: int, segment_ids=None):
    """The new tokens' segment ids ``[B, T]`` (None = segment 0, as in ``Attention.decode``) and the
    state to start from: ``cache.state`` zeroed in rows whose first new token starts a new segment."""
    seg = jnp.zeros((batch, t), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    if seg.shape != (batch, t) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"decode: segment_ids must be an int array of shape [{batch}, {t}]; got "
                         f"{seg.dtype}{list(seg.shape)}")
    seg = seg.astype(jnp.int32)
    keep = (seg[:, 0] == cache.seg_id)[:, None, None, None]
    return seg, jnp.where(keep, cache.state, 0.0)
