"""Tile sizes for the Pallas TPU kernels, keyed by TPU generation.

Keys are short generation names derived from ``device_kind`` (``"TPU v5 lite"`` -> ``"v5e"``,
``"TPU v5"`` / ``"TPU v5p"`` -> ``"v5p"``, ``"TPU v6 lite"`` -> ``"v6e"``); ``"default"`` serves an
unknown TPU and ``"interpret"`` serves interpret mode on CPU. The kind comes from the TPU being
compiled for: the default backend, or the abstract mesh under ahead-of-time lowering
(``pallas_kernels._target``).

These are reasoned starting points, not autotuned results: seqmix has no TPU benchmark numbers yet
(FAMILIES.md §6 anchors are splash / tokamax numbers). Pin tiles in tests and numerics benchmarks
with :func:`pinned` (FAMILIES.md §5.1 rule 9: block sizes change the summation order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from pallas_kernels import _target as _interpret
from pallas_kernels.tpu.flash_attention import FlashTiles

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tiles for one generation plus the limits the glue clamps them with.

    ``tiles.block_q`` is per query head; the forward and dq kernels stack the G heads of a GQA group,
    so ``block_q`` shrinks (to a multiple of ``q_align``, never below it) until
    ``G·block_q ≤ max_rows``; a block also halves while padding the sequence to it would waste more
    than ``max_pad`` of the work (one block when the whole sequence fits). ``vmem_limit_bytes`` is
    passed to Mosaic (the default scoped limit is 16 MiB on v5e/v5p and 32 MiB on v6e, below what
    the larger tiles need). The glue then halves tiles further if its VMEM estimate exceeds 3/4
    of the limit (large head dims, fp32, large G).
    """

    tiles: FlashTiles
    max_rows: int
    vmem_limit_bytes: int | None
    q_align: int = 128  # lse rows are lane-dense: block_q must be a multiple of 128 on a real TPU
    kv_align: int = 128
    max_pad: float = 0.125  # blocks halve while padding a length to them wastes more than this


# Why each choice (D = 128, bf16; reasoned, not yet measured on hardware):
# - A forward kv step loads block_kv·(D + Dv)·2 bytes and does 4·rows·block_kv·D flops: intensity
#   2·rows flop/byte against ridge points of ≈240 (v5e: 197 TF/s, 0.82 TB/s), ≈190 (v5p: 459 TF/s,
#   2.46 TB/s) and ≈560 (v6e: 918 TF/s, 1.64 TB/s): rows ≥ 1024 keeps K/V re-reads off the critical path.
# - Every grid step costs ~0.35 µs, skipped steps included. A 1024 × 1024 × D=128 forward step is
#   0.54 GFLOP: 2.7 µs on v5e, 0.6 µs on v6e, so v6e takes 2048 × 2048 blocks.
# - Large blocks waste work on the causal diagonal unless it is skipped at a finer grain: every
#   kernel walks a kv block in block_kv_compute chunks with their own EMPTY/PARTIAL/FULL kinds, so
#   the block size sets the DMA and step overhead while the chunk sets the skip granularity and the
#   fp32 score tile (rows × chunk × 4 B, 2-4 live copies). Chunks are a multiple of the MXU width
#   (128 on v5e/v5p, 256 on v6e) and 512 keeps a G=4 group's 4096 × 512 score tile at 8 MiB.
# - max_rows caps the GQA-stacked q tile (G·block_q) so the fp32 accumulator and scores fit.
# - The dkv kernel keeps (block_kv × D) fp32 dk/dv accumulators and, per head of the group, one
#   (chunk × block_q_bwd) fp32 score tile; the dq kernel mirrors the forward with smaller q blocks
#   (it keeps three (rows × chunk) fp32 tiles: s/p, dp, ds).
# - vmem_limit_bytes raises Mosaic's scoped VMEM limit (default 16 MiB on v5e/v5p, 32 MiB on v6e)
#   to what these tiles need with headroom; docs/tpu_compile_report.md lists what each kernel uses.
TABLE: dict[str, FlashBlocks] = {
    # v5e: 4 MXUs 128x128, 128 MiB VMEM.
    "v5e": FlashBlocks(FlashTiles(1024, 1024, 512, 1024, 1024, 512), max_rows=2048,
                       vmem_limit_bytes=64 * MiB),
    # v5p: 4 MXUs 128x128 per core (megacore: the parallel grid axes split over 2 cores),
    # 64 MiB VMEM per core: same tiles as v5e, a tighter limit.
    "v5p": FlashBlocks(FlashTiles(1024, 1024, 512, 1024, 1024, 512), max_rows=2048,
                       vmem_limit_bytes=48 * MiB),
    # v6e: 2 MXUs 256x256 (4x the flops per pass), 128 MiB VMEM: twice the rows and keys per step.
    "v6e": FlashBlocks(FlashTiles(2048, 2048, 512, 1024, 2048, 512), max_rows=4096,
                       vmem_limit_bytes=96 * MiB),
    # Unknown TPU (v4 has 16 MiB VMEM): tiles that fit Mosaic's default scoped limit.
    "default": FlashBlocks(FlashTiles(512, 512, 256, 512, 512, 256), max_rows=1024,
                           vmem_limit_bytes=None),
    # Interpret mode on CPU: many small blocks, two chunks per kv block, so that a short test
    # crosses block and chunk boundaries; no lane alignment is needed there.
    "interpret": FlashBlocks(FlashTiles(32, 64, 32, 32, 64, 32), max_rows=256,
                             vmem_limit_bytes=None, q_align=8, kv_align=8, max_pad=1.0),
}

_KINDS = {
    "TPU v5 lite": "v5e", "TPU v5e": "v5e",
    "TPU v5": "v5p", "TPU v5p": "v5p",
    "TPU v6 lite": "v6e", "TPU v6e": "v6e",
}

_state = threading.local()


def generation(device_kind: str | None = None) -> str:
    """The table key for ``device_kind`` (default: the current target; ``"interpret"`` if none)."""
    if device_kind is None:
        if _interpret.is_interpreting():
            return "interpret"
        device_kind = _interpret.tpu_target_kind()
        if device_kind is None:
            return "default"
    return _KINDS.get(device_kind, "default")


def current(device_kind: str | None = None) -> tuple[str, FlashBlocks]:
    """(table key or ``"pinned"``, tiles) for the current target (or ``device_kind``)."""
    pin = getattr(_state, "pinned", None)
    if pin is not None:
        return "pinned", pin
    key = generation(device_kind)
    return key, TABLE[key]


def flash_blocks(device_kind: str | None = None) -> FlashBlocks:
    """The tiles for the current target (or ``device_kind``); :func:`pinned` overrides."""
    return current(device_kind)[1]


@contextlib.contextmanager
def pinned(blocks: FlashBlocks | FlashTiles):
    """Use ``blocks`` for every kernel call inside the ``with`` block (tests, benchmarks)."""
    if isinstance(blocks, FlashTiles):
        base = TABLE["interpret"] if _interpret.is_interpreting() else TABLE["default"]
        blocks = dataclasses.replace(base, tiles=blocks)
    prev = getattr(_state, "pinned", None)
    _state.pinned = blocks
    try:
        yield blocks
    finally:
        _state.pinned = prev
