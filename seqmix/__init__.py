"""seqmix: every modern attention family as a JAX/Flax NNX module.

``seqmix.ops`` holds the functional ops (no Flax), ``seqmix.nn`` the Flax NNX modules, ``seqmix.models``
a small LM whose per-layer mixers come from a spec string, ``seqmix.train`` the trainer; ``seqmix.load(run_dir)`` returns a trained model.
"""

from seqmix import ops
from seqmix.ops import attention, explain, masks

__version__ = "0.1.0"
__all__ = ["attention", "capability_matrix", "explain", "load", "masks", "ops"]


def load(run_dir, step=None):
    """The trained ``seqmix.models.LM`` of a ``seqmix train`` run directory (checkpoint ``step``, default
    the latest finished one). See :mod:`seqmix.train.loading`."""
    from seqmix.train.loading import load as _load

    return _load(run_dir, step)


def capability_matrix() -> str:
    """The capability matrix as markdown (read from the family records; import order does not matter)."""
    return ops.capability_markdown()
