"""The ``seqmix`` command: info, errors with exit status 2, train end to end (and resume), bench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import seqmix
from seqmix.cli import main
from seqmix.train.metrics import read_metrics

TINY = ["--d-model", "32", "--num-heads", "2", "--mixers", "attn", "--seq-len", "32", "--batch-size", "4",
        "--warmup", "1", "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2"]
REPO = Path(seqmix.__file__).resolve().parents[1]


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "xla" in out and "jax" in out and "flax" in out
    assert "| family |" in out


@pytest.mark.parametrize("argv,match", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--steps", "many"], "invalid int value"),
    (["train", "--task", "words"], "invalid choice"),
    (["train", "--mixers", "attn,nope"], "unknown mixer 'nope'"),
    (["train", "--task", "mqar", "--seq-len", "16"], "too short for num_kv_pairs=8"),
    (["train", "--mesh", "data=2"], "needs 2 devices"),
    (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--stop-at", "0"], "--stop-at must be >= 1"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_exit_2(capsys, tmp_path, argv, match):
    code, err = _exit_code(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" and
                                   "--resume" not in argv else []), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_train_end_to_end_then_resume(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "6", "--stop-at", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "metrics" in text and "checkpoint" in text and "bits/byte" in text and "unigram entropy" in text
    assert "sample 'def '" in text
    assert (out / "metrics.png").is_file() and (out / "checkpoints" / "4").is_dir()
    # Resuming takes the saved settings; only the given flags change.
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "step 6" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    code, err = _exit_code(["train", "--resume", "--out", str(out), "--d-model", "64"], capsys)
    assert code == 2 and "cannot change d_model" in err
    code, err = _exit_code(["train", *TINY, "--steps", "6", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err


def test_train_mqar(capsys, tmp_path):
    argv = ["train", "--task", "mqar", *TINY, "--num-kv-pairs", "4", "--steps", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "val accuracy" in capsys.readouterr().out
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert 0 <= final["val_acc"] <= 1


def test_train_on_a_two_device_mesh(tmp_path):
    """The batch sharded over data=2 (two simulated CPU devices) trains like one device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "seqmix.cli", "train", "--task", "mqar", "--num-kv-pairs", "4", *TINY,
           "--steps", "2", "--mesh", "data=2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["mesh"]["data"] == 2
    assert 0 <= summary["final"]["val_acc"] <= 1 and summary["final"]["val_loss"] < 6.0


def test_bench(capsys, monkeypatch, tmp_path):
    if (REPO / "experiments" / "bench.py").is_file():
        assert main(["bench", "--help"]) == 0
        assert "usage" in capsys.readouterr().out
    monkeypatch.setattr(seqmix, "__file__", str(tmp_path / "site" / "seqmix" / "__init__.py"))
    assert main(["bench"]) == 2
    assert "experiments/bench.py not found" in capsys.readouterr().err
