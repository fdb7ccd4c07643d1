"""Tile policy of ``attention``'s chunked ``xla`` form when the caller names no ``block_q`` / ``block_kv``.

Each step of the form's band loop (FAMILIES.md §3.1) costs a fixed overhead besides its matmuls (two
forward, four backward, over every batch row and head at once), so on CPU larger steps win until their
fp32 score tiles leave the cache. Measured on CPU (2 idle cores, jax 0.10.2, fp32, B = 1, H = 4, D = 64;
one process, candidates interleaved, best of 3; ``experiments/xla_tiles_probe.py``, JSON in
``docs/bench/xla_tiles_cpu.json``), ms and the compiled temp memory of forward + backward:

    causal        T = 1024  (128,128) fwd 13  fwd+bwd 35    5.7 MiB | (512,256)  8 / 30   15.6 MiB
                  T = 2048  (128,128)     43          133   9.7     | (512,256) 29 / 101  18.1
                  T = 4096  (128,128)    180          568  17.8     | (256,256) 132 / 450  21.4
                                                                    | (512,256)  86 / 322  26.2
                                                                    | (512,512)  89 / 408  34.7
                  T = 8192  (128,128)    590         1945  33.9     | (512,256) 282 / 1046 42.3
                                                                    | (512,512) 275 / 1282 50.8
    window 1024   T = 8192  (128,128)    181          604  33.9     | (512,256) 121 / 487  42.3
    chunked 512   T = 4096  (128,128)     29           88  17.8     | (512,256)  25 / 90   26.2
    2-D NA 64², k 7 (4096)  (128,128)     56          162  17.8     | (512,256)  44 / 153  26.2

So a step should hold about :data:`TARGET_PAIRS` (query, key) pairs over the batch and heads: ``(512,
256)`` at ``B·Hq = 4`` (the measured case), ``(256, 256)`` at 8, ``(256, 128)`` at 16, ``(128, 128)``
from 32 on (the same per-step work, extrapolated, not measured), for sequences of at least
:data:`MIN_LENGTH` (shorter ones gain less and pay in memory) whose band is not too sparse for the larger
tiles (``fill`` ≥ :data:`MIN_FILL`: the allowed pairs over the pairs the band loop computes, for
default positions; every case above has 0.5 or more with ``(512, 256)`` except the neighborhood, 0.05,
which keeps ``(128, 128)`` though it ran a little faster with the larger tiles). Other platforms keep
``(128, 128)``: the ``xla`` form is their fallback and nothing there is measured yet. The fill costs
about 0.1–2 s of eager work once per mask and lengths in a process (then cached).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _target
from seqmix.ops import block_meta
from seqmix.ops import masks as masks_lib

SMALL = (128, 128)
LADDER = ((128, 128), (256, 128), (256, 256), (512, 256))  # increasing pairs per step
TARGET_PAIRS = 4 * 512 * 256  # per step, over batch and heads: the measured best at B·Hq = 4
MIN_FILL = 0.45
MIN_LENGTH = 2048
SAMPLE = 8  # query rows counted for the fill: every 8th


@functools.lru_cache(maxsize=512)
def _fill_cached(mask, tq: int, s: int, bq: int, bk: int) -> float:
    tp, sp = -(-tq // bq) * bq, -(-s // bk) * bk
    with jax.ensure_compile_time_eval():
        q_pos = jnp.asarray(np.minimum(s - tq + np.arange(tp), s - 1), jnp.int32)
        kv_pos = jnp.asarray(np.where(np.arange(sp) < s, np.arange(sp), -1), jnp.int32)
        cls = np.asarray(block_meta.classify_blocks(mask, q_pos, kv_pos, q_pos[None], kv_pos[None], None, None,
                                                    jnp.arange(tp) < tq, bq, bk))
        rows = q_pos[:tq:SAMPLE]  # every SAMPLE-th query row: the fill to ~1%, at 1/SAMPLE of the cost
        ok = block_meta.full_allowed(mask, rows, kv_pos[:s], rows[None], kv_pos[None, :s], None, None)
        allowed = float(np.asarray(ok).sum()) * tq / rows.shape[0]
    computed = int((cls != masks_lib.EMPTY).sum()) * bq * bk
    return allowed / computed if computed else 1.0


def band_fill(mask, tq: int, s: int, bq: int, bk: int) -> float:
    """The fraction of allowed pairs among those the band loop computes with tiles (bq, bk), for default
    positions and no segments (counted on every :data:`SAMPLE`-th query row, once per mask and lengths)."""
    try:
        return _fill_cached(mask, tq, s, bq, bk)
    except Exception:  # noqa: BLE001 - an unhashable or untraceable mask: assume a poorly filled band
        return 0.0


def choose(mask, tq: int, s: int, batch_heads: int) -> tuple[int, int]:
    """``(block_q, block_kv)`` for a call with no tiles named; ``batch_heads = B·Hq`` (module docstring)."""
    if _target.platform() != "cpu" or min(tq, s) < MIN_LENGTH:
        return SMALL
    tiles = next((t for t in LADDER if batch_heads * t[0] * t[1] >= TARGET_PAIRS), LADDER[-1])
    if tiles == SMALL or band_fill(mask, tq, s, *tiles) >= MIN_FILL:
        return tiles
    return SMALL
