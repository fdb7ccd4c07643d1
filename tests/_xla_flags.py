"""XLA flags for test processes: compile fast (tests are dominated by compiling many small programs).

``--xla_backend_optimization_level=0`` and ``--xla_llvm_disable_expensive_passes`` lower only the LLVM
code generation effort of XLA:CPU; the HLO passes (fusion, layout, buffer assignment) are unchanged, so
numerics and memory analyses are those of the default build. Measured on the attention, decode,
neighborhood and edge-value tests (127 cases, 2 workers): 375 s -> 242 s. Benchmarks never use them.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def add(*flags: str) -> None:
    """Append ``flags`` to ``XLA_FLAGS`` (before JAX starts), keeping what the caller set."""
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in flags if f not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
