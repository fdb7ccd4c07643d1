"""Two processes on localhost join one run through ``seqmix train`` itself (gloo CPU collectives, 4 forced
CPU devices each, the ``seq`` axis spanning both): SIGTERM mid-run checkpoints both at the same step (they
agree on it) and exits 143; ``--resume`` continues; the whole loss curve equals a one-process run's, written
once, by process 0, which alone prints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 30
RUN = ["--task", "bytes", "--mixers", "attn,gdn", "--d-model", "32", "--num-heads", "4", "--seq-len", "64",
       "--batch-size", "4", "--steps", str(STEPS), "--warmup", "2", "--log-every", "1", "--eval-every",
       str(STEPS), "--ckpt-every", "10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "seqmix.cli", "train", *RUN, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two(out: Path, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [_launch(out, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
                    "--mesh", "seq=8", *extra, devices=4) for i in range(2)]


def _finish(procs, timeout=600) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


def _train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)), f"steps written twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(line)["step"] for line in lines[:-1] if '"train"' in line] or [0])


def test_two_processes_through_the_command_sigterm_resume_equal_one_process(tmp_path):
    run = tmp_path / "two"
    procs = _two(run)
    deadline = time.monotonic() + 600
    while _logged_step(run) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    (code0, out0, err0), (code1, out1, err1) = _finish(procs)
    logs = f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"
    assert (code0, code1) == (143, 143), f"expected both to stop on SIGTERM (exit 143)\n{logs}"
    assert "resume with: seqmix train --out" in err0 and "resume with" not in err1  # process 0 alone prints
    assert "joined a run of 2 processes" in err0
    stopped = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1]
    assert 3 <= stopped < STEPS, stopped

    resumed = _finish(_two(run, "--resume"))
    assert [r[0] for r in resumed] == [0, 0], "\n".join(r[2][-3000:] for r in resumed)
    assert "metrics    " in resumed[0][1] and "metrics    " not in resumed[1][1]

    (ref_code, _, ref_err), = _finish([_launch(tmp_path / "one")])
    assert ref_code == 0, ref_err[-3000:]
    two, one = _train_losses(run), _train_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))  # one curve across the restart
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-4)
