"""Two processes on localhost (gloo CPU collectives, 4 forced CPU devices each) train with the ``seq``
axis spanning both processes, checkpoint with Orbax, restore and continue; the loss curve equals a
single-device run's. Skips (with the reason) where the jaxlib has no gloo / distributed runtime."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, ndev: int, out: Path, mesh: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "tests.train.mp_worker", str(process_id), str(num_processes),
                             str(port), str(ndev), str(out), mesh], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _collect(procs: list[subprocess.Popen], timeout: int = 900) -> tuple[list[dict], str]:
    recs, logs = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
        logs.append(out[-3000:])
        recs += [json.loads(line[len("MPTRAIN "):]) for line in out.splitlines() if line.startswith("MPTRAIN ")]
    return recs, "\n----\n".join(logs)


def test_two_process_sequence_parallel_train_checkpoint_resume(tmp_path):
    port = _free_port()
    run_dir = tmp_path / "two"
    workers = [_start(i, 2, port, 4, run_dir, "seq=8") for i in range(2)]
    ref = _start(0, 1, 0, 1, tmp_path / "ref", "")
    recs, log = _collect(workers)
    ref_recs, ref_log = _collect([ref])
    skips = [r["skip"] for r in recs if "skip" in r]
    if skips:
        pytest.skip(skips[0])
    errors = [r["error"] for r in recs + ref_recs if "error" in r]
    assert not errors, errors[0]

    def curve(records, process):
        parts = {r["part"]: r for r in records if r.get("process") == process and "part" in r}
        assert set(parts) == {"first", "resumed"}, f"missing parts for process {process}:\n{log}\n{ref_log}"
        return parts, {int(k): v for p in parts.values() for k, v in p["losses"].items()}

    ref_parts, ref_curve = curve(ref_recs, 0)
    assert sorted(ref_curve) == list(range(1, 7))
    for process in (0, 1):
        parts, losses = curve(recs, process)
        first = parts["first"]
        assert (first["devices"], first["processes"]) == (8, 2)
        assert first["mesh"]["seq"] == 8  # the sequence axis spans both processes
        assert sorted(int(k) for k in first["losses"]) == [1, 2, 3]  # stopped at 3, checkpointed
        assert sorted(int(k) for k in parts["resumed"]["losses"]) == [4, 5, 6]  # restored from step 3
        np.testing.assert_allclose([losses[s] for s in range(1, 7)], [ref_curve[s] for s in range(1, 7)], rtol=1e-4)
        np.testing.assert_allclose(parts["resumed"]["val_loss"], ref_parts["resumed"]["val_loss"], rtol=1e-4)
    assert (run_dir / "checkpoints" / "3").is_dir() and (run_dir / "checkpoints" / "6").is_dir()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 7))  # one curve across the restart, written once (process 0)
