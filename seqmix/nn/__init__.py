"""Flax NNX modules: parameters and projections around one ``seqmix.ops`` call each."""

from seqmix.nn.attention import Attention
from seqmix.nn.blocks import Block
from seqmix.nn.mlp import SwiGLU
from seqmix.nn.norm import RMSNorm
from seqmix.nn.rope import apply_rope, rope_frequencies

__all__ = ["Attention", "Block", "RMSNorm", "SwiGLU", "apply_rope", "rope_frequencies"]
