"""What the run covers and what counts as a GPU implementation: the script's name, dtypes, the benchmark's
specs, flash-linear-attention's ops, the discovery of GPU implementations, and the short error text."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _target
from seqmix.ops import _registry


SCRIPT = "experiments/gpu_device_run.py"
BF16, FP16, FP32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
GPU_PREFIXES = ("pallas_gpu", "cudnn")

# The benchmark the issue asks for; implementations named here get rows even when not registered.
ATTENTION_SPEC = dict(family="attention", shape=(2, 8192, 16, 128), dtype=BF16,
                      masks=("causal", "full", "window:4096"), modes=("fwd", "fwd+bwd"),
                      impls=("pallas_gpu", "cudnn", "xla"))
RECURRENT_SPEC = dict(families=("simple_gla", "gla", "gated_delta_rule"), shape=(4, 8192, 16, 128), dtype=BF16,
                      modes=("fwd+bwd",), impls=("pallas_gpu", "xla"), external=("fla",),
                      variants=("pallas_gpu@stages=1",))
# A/B candidates: a registry implementation rerun with one tile setting of the recurrent Mosaic GPU kernels
# changed (pallas_kernels.gpu.gated_linear.GLATiles, which the delta-rule kernels share). "stages=1": the
# chunk loop without its input ring (load, then compute) against the default 2 (pallas_kernels.gpu.chunk_loop).
# Timed last in their group, after fla, so that they only take time the required rows left.
VARIANTS = {"pallas_gpu@stages=1": ("pallas_gpu", {"stages": 1})}
SMOKE_ATTENTION_SHAPE = (1, 64, 2, 16)
SMOKE_RECURRENT_SHAPE = (1, 80, 2, 16)

# flash-linear-attention's chunk kernels: same [B, T, H, D] layout, log-space gates, scale defaulting to
# Dk^-0.5, positional (q, k, v, g[, beta]) like seqmix's ops.
FLA_OPS = {"simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
           "gla": ("fla.ops.gla", "chunk_gla"),
           "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}


def is_gpu_impl(impl: _registry.Implementation) -> bool:
    """A GPU library call (backend ``"gpu"``), a GPU kernel (``"mosaic_gpu"``, any backend naming a GPU) or
    an implementation named like one."""
    return "gpu" in (impl.backend or "") or impl.name.startswith(GPU_PREFIXES)


def run_problem(impl: _registry.Implementation, call, smoke: bool) -> str | None:
    """Why ``impl`` is not run for ``call`` here (None: it runs): its backend cannot run for this target,
    the smoke run would only interpret it, or its ``supports()`` refuses the call."""
    if impl.backend:
        problem = _target.backend_problem(impl.backend)
        if problem:
            return problem
        if smoke and _target.platform() != "gpu":
            return (f"--cpu-smoke runs only what runs natively on CPU; backend {impl.backend!r} would run in an "
                    f"interpreter here (the device run compiles it)")
    try:
        return impl.supports(call)
    except Exception as err:  # noqa: BLE001 - never a pass
        return f"supports() raised {_short(err)}"


def gpu_impls(fam: _registry.Family) -> list[str]:
    return [i.name for i in fam.implementations.values() if is_gpu_impl(i)]


def _short(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."
