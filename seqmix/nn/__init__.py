"""Flax NNX modules: parameters and projections around one ``seqmix.ops`` call each.

One file per module family; each registers its mixer names (``seqmix.nn.mixer``).
"""

from seqmix.nn.attention import Attention, AttentionCache
from seqmix.nn.based import Based, BasedCache
from seqmix.nn.blocks import Block
from seqmix.nn.delta_net import DeltaNet, GatedDeltaNet
from seqmix.nn.feature_maps import HedgehogFeatureMap, attention_distillation_loss
from seqmix.nn.gla import GatedLinearAttention, SimpleGLA
from seqmix.nn.linear_attention import LinearAttention, hedgehog_distillation_loss
from seqmix.nn.mixer import MixerDims, build_mixer, register_mixer, registered_mixers
from seqmix.nn.mlp import SwiGLU
from seqmix.nn.moba import MoBAAttention
from seqmix.nn.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from seqmix.nn.norm import RMSNorm
from seqmix.nn.recurrent_cache import RecurrentCache
from seqmix.nn.retention import Retention
from seqmix.nn.rope import apply_rope, rope_frequencies
from seqmix.nn.short_conv import QKVConvs, ShortConv

__all__ = [
    "Attention", "AttentionCache", "Based", "BasedCache", "Block", "DeltaNet", "GatedDeltaNet", "GatedLinearAttention",
    "HedgehogFeatureMap", "LinearAttention", "MixerDims", "MoBAAttention", "NeighborhoodAttention1D",
    "NeighborhoodAttention2D", "NeighborhoodAttention3D", "RMSNorm", "RecurrentCache", "QKVConvs", "Retention", "ShortConv",
    "SimpleGLA", "SwiGLU", "apply_rope", "attention_distillation_loss", "build_mixer", "hedgehog_distillation_loss",
    "register_mixer", "registered_mixers", "rope_frequencies",
]
