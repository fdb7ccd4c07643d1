"""The one home of the sequence-parallel strategy names (FAMILIES.md §4) and the functions behind them.

Softmax strategies take local q, k, v shards; recurrent strategies take the family name first. A
family's record lists the strategies that serve it (``Family.sequence_parallel``); :func:`for_family`
returns the function.
"""

from __future__ import annotations

import functools
from typing import Callable

from seqmix.ops import _registry
from seqmix.parallel.allgather import allgather_attention
from seqmix.parallel.lasp import lasp1, lasp2
from seqmix.parallel.ring import ring_attention
from seqmix.parallel.ulysses import ulysses_attention

SOFTMAX_STRATEGIES: dict[str, Callable] = {
    "allgather": allgather_attention,
    "ring": ring_attention,
    "ulysses": ulysses_attention,
}
RECURRENT_STRATEGIES: dict[str, Callable] = {"lasp2": lasp2, "lasp1": lasp1}
SOFTMAX_STRATEGY_NAMES = tuple(SOFTMAX_STRATEGIES)
RECURRENT_STRATEGY_NAMES = tuple(RECURRENT_STRATEGIES)
LASP2H = {"softmax": "allgather", "recurrent": "lasp2"}  # one all-gather per layer of a hybrid (§4.8)


def for_family(family: str, strategy: str) -> Callable:
    """The strategy function for ``family`` (a recurrent family's is bound to it). ValueError if the
    family's record does not list ``strategy``."""
    fam = _registry.get_family(family)
    if strategy not in fam.sequence_parallel:
        raise ValueError(f"family {family!r} is served by strategies {list(fam.sequence_parallel)}; "
                         f"got {strategy!r}")
    if strategy in fam.sp_functions:
        return fam.sp_functions[strategy]
    if fam.kind == "softmax":
        return SOFTMAX_STRATEGIES[strategy]
    fn = functools.partial(RECURRENT_STRATEGIES[strategy], family)
    fn.__name__ = f"{strategy}_{family}"
    return fn


def lasp2h(family: str) -> Callable:
    """The LASP-2H strategy for a layer of ``family``: all-gather KV for softmax families, LASP-2 otherwise."""
    return for_family(family, LASP2H[_registry.get_family(family).kind])
