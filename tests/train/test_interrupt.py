"""Nothing lost: Ctrl-C / SIGTERM during ``seqmix train`` checkpoint and resume bit-identically, and a
checkpoint killed mid-save (SIGKILL) is never the one ``--resume`` picks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import seqmix
from seqmix.train.checkpoint import Checkpointer
from seqmix.train.metrics import read_metrics
from seqmix.train.trainer import load_run_config, prepare, train
from tests.train.interrupt_cases import CLI_FLAGS, tiny_mqar

REPO = Path(seqmix.__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _train_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"}


def _interrupt(cmd, out: Path, after_step: int, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd``, send ``sig`` once metrics show ``after_step``; return the finished process and the
    last logged step."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and max(_train_losses(out), default=0) >= after_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), max(_train_losses(out))


def test_sigint_then_sigterm_checkpoint_and_resume_bit_identically(tmp_path):
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "seqmix.cli", "train", *CLI_FLAGS, "--out", str(out)]
    # Ctrl-C in the first run, SIGTERM (a preemption notice) in the resumed one.
    first, step1 = _interrupt(cli + ["--steps", "100000"], out, 3, signal.SIGINT)
    second, step2 = _interrupt(cli + ["--resume"], out, step1 + 2, signal.SIGTERM)
    for proc, sig, step in ((first, signal.SIGINT, step1), (second, signal.SIGTERM, step2)):
        assert proc.returncode == 128 + sig, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"interrupted by {sig.name} at step {step}; checkpoint saved in {out}/checkpoints/{step}" in proc.stderr
        assert f"resume with: seqmix train --out {out} --resume" in proc.stderr
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.latest_step() == step2
    # Continue to step2 + 2 and compare every step's loss with one uninterrupted run.
    cfg = load_run_config(out)
    train(cfg, resume=True, stop_at=step2 + 2, progress=False)
    ref = tmp_path / "ref"
    train(cfg.replace(out=str(ref)), stop_at=step2 + 2, progress=False)
    resumed, straight = _train_losses(out), _train_losses(ref)
    assert sorted(resumed) == list(range(1, step2 + 3))
    assert resumed == straight  # bit-identical: the same floats


def test_a_checkpoint_killed_mid_save_is_never_resumed_from(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tests.train.kill_during_save_worker", str(out), "4"], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name != "2"]
    assert leftovers and all(not name.isdigit() for name in leftovers), leftovers  # step 4: written, not committed
    cfg = load_run_config(out)
    assert prepare(cfg, resume=True).resume_step == 2
    result = train(cfg, resume=True, stop_at=6, progress=False)
    assert result.steps_done == 4 and result.checkpoint_path == out / "checkpoints" / "6"
    ref = train(tiny_mqar(tmp_path / "ref", steps=8), stop_at=6, progress=False)
    assert _train_losses(out) == _train_losses(tmp_path / "ref") and ref.steps_done == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
