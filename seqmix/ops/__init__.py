"""Functional ops, one per attention family, dispatched to an implementation by the registry.

Each family is one op file that registers its complete record (``seqmix.ops._registry``); importing
this package registers every family, so the capability matrix does not depend on import order.
"""

from seqmix.ops import masks
from seqmix.ops._debug import debug_checks
from seqmix.ops._registry import BACKWARD_FLOPS, FAMILIES, explain, get_family, useful_flops, with_backward
from seqmix.ops.attention import (KVCache, attention, attention_decode, cache_size_for, init_kv_cache,
                                  merge_lse, update_kv_cache)
from seqmix.ops.delta_rule import delta_rule, delta_rule_step
from seqmix.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from seqmix.ops.gla import gla, gla_step
from seqmix.ops.moba import MoBACache, init_moba_cache, moba, moba_decode
from seqmix.ops.per_head import PerHeadCache, attention_decode_per_head, attention_per_head, init_per_head_cache
from seqmix.ops.neighborhood import neighborhood_attention, neighborhood_decode
from seqmix.ops.neighborhood_mask import CausalNeighborhood, Neighborhood, neighborhood
from seqmix.ops.linear_attention import linear_attention, linear_attention_step, taylor_feature_map
from seqmix.ops.retention import lightning_decay, retention, retention_step, retnet_decay
from seqmix.ops.simple_gla import simple_gla, simple_gla_step
from seqmix.ops._capabilities import capability_markdown, capability_rows  # noqa: E402

__all__ = [
    "BACKWARD_FLOPS", "CausalNeighborhood", "FAMILIES", "KVCache", "Neighborhood", "attention", "attention_decode", "cache_size_for",
    "capability_markdown", "capability_rows", "debug_checks", "delta_rule", "delta_rule_step", "explain",
    "gated_delta_rule", "gated_delta_rule_step", "get_family", "gla", "gla_step", "init_kv_cache",
    "lightning_decay", "linear_attention", "linear_attention_step", "masks", "merge_lse", "MoBACache",
    "init_moba_cache", "moba", "moba_decode", "neighborhood", "PerHeadCache", "attention_decode_per_head",
    "attention_per_head", "init_per_head_cache",
    "neighborhood_attention", "neighborhood_decode", "retention", "retention_step", "retnet_decay", "simple_gla", "simple_gla_step",
    "taylor_feature_map", "update_kv_cache", "useful_flops", "with_backward",
]
