"""Timed calls and the comparison of outputs: one synchronized call, arrays between JAX and PyTorch, errors."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .common import BF16, FP16, FP32


class Runner:
    """One synchronized call: ``sync(); t0; call(); sync(); t1`` (JAX: ``call`` blocks until ready)."""

    def __init__(self, call: Callable[[], Any], sync: Callable[[], None] | None = None):
        self.call, self.sync = call, sync or (lambda: None)

    def run(self):
        out = self.call()
        self.sync()
        return out

    def timed(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.call()
        self.sync()
        return time.perf_counter() - t0


@jax.jit
def _err(x, r):
    x, r = x.astype(jnp.float32), r.astype(jnp.float32)
    d = x - r
    return (jnp.sqrt(jnp.sum(d * d)) / (jnp.sqrt(jnp.sum(r * r)) + 1e-8), jnp.max(jnp.abs(d)))


def _to_jax(x):
    if isinstance(x, jax.Array):
        return x
    try:  # a torch tensor
        return jax.dlpack.from_dlpack(x.detach().contiguous())
    except Exception:  # noqa: BLE001 - through the host
        return jnp.asarray(x.detach().float().cpu().numpy())


def _to_torch(x):
    import torch

    jax.block_until_ready(x)
    try:
        t = torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - through the host (bf16 goes via fp32: exact)
        dtype = {BF16: torch.bfloat16, FP16: torch.float16, FP32: torch.float32}[jnp.dtype(x.dtype)]
        t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device="cuda", dtype=dtype)
    return t.clone()  # its own memory


def errors_vs(out, ref) -> dict | None:
    """Max relative rms and max abs error over the leaves of ``out`` against ``ref`` (same structure)."""
    xs, rs = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)
    if len(xs) != len(rs):
        return None
    errs = []
    for x, r in zip(xs, rs):
        x = _to_jax(x)
        if x.shape != r.shape:
            return None
        errs.append(tuple(float(v) for v in _err(x, r)))
    return dict(rms=float(np.max([e[0] for e in errs])), max_abs=float(np.max([e[1] for e in errs])))  # NaN stays
