"""Train a tiny hybrid LM on 1 device and sequence-parallel on 8 forced CPU devices; print the loss curves.

    python -m tests.parallel.sp_train_worker NUM_DEVICES OUT_DIR CASE [CASE ...]

NUM_DEVICES forced CPU devices (1: no forcing, the single-device reference). A case is
``MESH:STRATEGY``, e.g. ``:allgather`` (the default mesh: 1 device), ``seq=8:allgather``,
``data=2,seq=4:ring``. Prints one ``SPTRAIN {json}`` line per case with the train losses by step and
the final validation loss. Run by ``tests/parallel/test_sp_model.py`` in a subprocess.
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
_N = int(sys.argv[1]) if len(sys.argv) > 1 else 8
_FLAGS = f"--xla_force_host_platform_device_count={_N}"
if _N > 1 and _FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), _FLAGS]).strip()

import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from seqmix.train.config import TrainConfig  # noqa: E402
from seqmix.train.trainer import train  # noqa: E402

TINY = TrainConfig(task="bytes", mixers="attn,gdn", d_model=32, num_heads=4, seq_len=64, batch_size=4, steps=10,
                   warmup=2, log_every=1, eval_every=10, ckpt_every=10, eval_batches=1, sample_len=0)


def errors(out_dir):
    """The trainer's set-up errors for a sequence that does not split over the seq axis."""
    from seqmix.train.trainer import prepare

    got = {}
    for name, cfg in (("indivisible", TINY.replace(mesh="seq=8", seq_len=36)),
                      ("zigzag", TINY.replace(mesh="seq=8", seq_len=72, sp_layout="zigzag")),
                      ("ulysses_heads", TINY.replace(mesh="seq=8", sp_strategy="ulysses"))):
        try:
            prepare(cfg.replace(out=str(Path(out_dir) / name)))
            got[name] = None
        except ValueError as err:
            got[name] = str(err)
    return got


def main(out_dir, cases):
    for i, case in enumerate(cases):
        if case == "errors":
            print("SPTRAIN " + json.dumps({"id": case, "ok": True, "errors": errors(out_dir)}), flush=True)
            continue
        mesh, _, strategy = case.rpartition(":")
        try:
            res = train(TINY.replace(mesh=mesh, sp_strategy=strategy, out=str(Path(out_dir) / f"run{i}")),
                        progress=False, log=lambda msg: None)
            rec = {"id": case, "ok": True, "losses": {str(k): v for k, v in res.train_losses.items()},
                   "val_loss": res.final["val_loss"], "mesh": res.summary["mesh"],
                   "sp": res.summary.get("sequence_parallel")}
        except Exception:  # noqa: BLE001 - reported to the test
            rec = {"id": case, "ok": False, "error": traceback.format_exc()[-3000:]}
        print("SPTRAIN " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3:])
