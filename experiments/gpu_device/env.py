"""The environment report: versions (or "absent"), devices, nvidia-smi's clocks, a measured bf16 matmul rate."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from seqmix import ops

from .common import BF16, _short, gpu_impls


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def _timed_median(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(smoke: bool) -> dict:
    dev = jax.devices()[0]
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), machine=platform.machine(), jax=jax.__version__,
               jaxlib=_dist_version("jaxlib"),
               jax_plugins={n: v for n in ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                                           "jax-cuda12-pjrt") if (v := _dist_version(n)) != "absent"},
               backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
               device_kind=dev.device_kind, compute_capability=getattr(dev, "compute_capability", None),
               torch=_dist_version("torch"), triton=_dist_version("triton"),
               fla=_dist_version("fla-core", "flash-linear-attention"),
               xla_python_client_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
               gpu_implementations={n: gpu_impls(f) for n, f in sorted(ops.FAMILIES.items()) if gpu_impls(f)})
    if shutil.which("nvidia-smi"):
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                 "temperature.gpu,power.draw", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as err:  # noqa: BLE001 - informational only
            env["nvidia_smi"] = _short(err)
    n = 256 if smoke else 8192
    try:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(BF16)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(BF16)
        f = jax.jit(jnp.dot).lower(a, b).compile()
        env["matmul_bf16_tflops"] = 2.0 * n ** 3 / _timed_median(lambda: f(a, b), 3 if smoke else 10) / 1e12
        env["matmul_size"] = n
    except Exception as err:  # noqa: BLE001
        env["matmul_bf16_tflops"] = None
        env["matmul_error"] = _short(err)
    return env
