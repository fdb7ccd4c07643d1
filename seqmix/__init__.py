"""seqmix: every modern attention family as a JAX/Flax NNX module."""

from seqmix import ops
from seqmix.ops import attention, explain, masks

__version__ = "0.1.0"
__all__ = ["attention", "explain", "masks", "ops"]
