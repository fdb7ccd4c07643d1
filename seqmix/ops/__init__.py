"""Functional ops, one per attention family, dispatched to an implementation by the registry."""

from seqmix.ops import masks
from seqmix.ops._registry import FAMILIES, capability_markdown, capability_rows, explain, get_family
from seqmix.ops.attention import (KVCache, attention, attention_decode, cache_size_for, init_kv_cache,
                                  merge_lse, update_kv_cache)
from seqmix.ops.delta_rule import delta_rule, delta_rule_step
from seqmix.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step

__all__ = [
    "FAMILIES", "KVCache", "attention", "attention_decode", "cache_size_for", "capability_markdown",
    "capability_rows", "delta_rule", "delta_rule_step", "explain", "gated_delta_rule",
    "gated_delta_rule_step", "get_family", "init_kv_cache", "masks", "merge_lse", "update_kv_cache",
]
