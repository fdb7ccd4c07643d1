"""Small LMs composed from ``seqmix.nn`` blocks, with a per-layer mixer pattern (hybrids)."""

from seqmix.models.lm import LM, LMConfig
from seqmix.models.mixers import MIXERS, build_mixer, parse_mixers, register_mixer, registered_mixers

__all__ = ["LM", "LMConfig", "MIXERS", "build_mixer", "parse_mixers", "register_mixer", "registered_mixers"]
