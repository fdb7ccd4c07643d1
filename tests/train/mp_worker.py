"""One process of a two-process training run on localhost (gloo CPU collectives); or the reference.

    python -m tests.train.mp_worker PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OUT_DIR MESH

With NUM_PROCESSES > 1: ``jax.distributed.initialize`` on ``localhost:PORT``, CPU collectives over
gloo, DEVICES_PER_PROCESS forced CPU devices each, then train ``TINY`` on ``MESH`` (e.g. ``seq=8``: the
sequence axis spans both processes) to step 3, checkpoint (Orbax), and resume from that checkpoint to
step 6 (a new ``train`` call: the state comes back from disk). With NUM_PROCESSES 1: the same in one
process (the reference). Prints ``MPTRAIN {json}`` lines: the losses of each part, or ``{"skip": why}``.
"""

from __future__ import annotations

import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, NDEV = (int(a) for a in sys.argv[1:5])
OUT_DIR, MESH = sys.argv[5], sys.argv[6] if len(sys.argv) > 6 else ""
os.environ["JAX_PLATFORMS"] = "cpu"
if NDEV > 1:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                        f"--xla_force_host_platform_device_count={NDEV}"]).strip()

import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402


def emit(rec):
    print("MPTRAIN " + json.dumps({"process": PROCESS_ID, **rec}), flush=True)


if NUM_PROCESSES > 1:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{PORT}", num_processes=NUM_PROCESSES,
                                   process_id=PROCESS_ID, initialization_timeout=120)
    except Exception as err:  # noqa: BLE001 - no gloo in this jaxlib, or no distributed runtime
        emit({"skip": f"multi-process CPU (gloo) unavailable: {type(err).__name__}: {err}"})
        sys.exit(0)

jax.config.update("jax_default_matmul_precision", "highest")

from seqmix.train.config import TrainConfig  # noqa: E402
from seqmix.train.trainer import train  # noqa: E402

TINY = TrainConfig(task="bytes", mixers="attn,gdn", d_model=32, num_heads=4, seq_len=64, batch_size=4, steps=6,
                   warmup=2, log_every=1, eval_every=6, ckpt_every=3, eval_batches=1, sample_len=0)


def main():
    cfg = TINY.replace(mesh=MESH, out=OUT_DIR)
    try:
        first = train(cfg, stop_at=3, progress=False, log=lambda msg: None)
        emit({"part": "first", "devices": jax.device_count(), "processes": jax.process_count(),
              "mesh": first.summary["mesh"], "losses": first.train_losses,
              "checkpoint": str(first.checkpoint_path)})
        resumed = train(cfg, resume=True, progress=False, log=lambda msg: None)
        emit({"part": "resumed", "losses": resumed.train_losses, "val_loss": resumed.final["val_loss"]})
    except Exception:  # noqa: BLE001 - reported to the test
        emit({"error": traceback.format_exc()[-3000:]})
    if NUM_PROCESSES > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
