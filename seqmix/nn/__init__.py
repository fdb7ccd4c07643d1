"""Flax NNX modules: parameters and projections around one ``seqmix.ops`` call each."""

from seqmix.nn.attention import Attention
from seqmix.nn.blocks import Block
from seqmix.nn.feature_maps import HedgehogFeatureMap, attention_distillation_loss
from seqmix.nn.linear import (Based, DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention, Retention,
                              SimpleGLA, hedgehog_distillation_loss)
from seqmix.nn.mlp import SwiGLU
from seqmix.nn.norm import RMSNorm
from seqmix.nn.recurrent_cache import RecurrentCache
from seqmix.nn.rope import apply_rope, rope_frequencies
from seqmix.nn.short_conv import ShortConv

__all__ = [
    "Attention", "Based", "Block", "DeltaNet", "GatedDeltaNet", "GatedLinearAttention", "HedgehogFeatureMap",
    "LinearAttention", "RMSNorm", "RecurrentCache", "Retention", "ShortConv", "SimpleGLA", "SwiGLU",
    "apply_rope", "attention_distillation_loss", "hedgehog_distillation_loss", "rope_frequencies",
]
