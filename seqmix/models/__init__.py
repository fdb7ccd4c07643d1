"""Small LMs composed from ``seqmix.nn`` blocks, with a per-layer mixer pattern (hybrids)."""

from seqmix.models.lm import LM, LMConfig
from seqmix.models.mixers import MIXERS, build_mixer, parse_mixers, register_mixer, registered_mixers
from seqmix.models import recurrent_mixers  # noqa: F401,E402  (registers linear, hedgehog, retnet, gla, simple_gla, deltanet, gdn, based)

__all__ = ["LM", "LMConfig", "MIXERS", "build_mixer", "parse_mixers", "register_mixer", "registered_mixers"]
