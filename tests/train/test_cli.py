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
    (["train", "--short-conv", "-1"], "short_conv must be an integer >= 0"),
    (["train", "--mixers", "attn*0"], "repeat count"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_exit_2(capsys, tmp_path, argv, match):
    code, err = _exit_code(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" and
                                   "--resume" not in argv else []), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def _last_bar_line(err: str) -> str:
    """The progress bar's final rendering (tqdm redraws with carriage returns)."""
    lines = [seg for line in err.splitlines() for seg in line.split("\r") if "train bytes" in seg]
    return lines[-1]


def test_train_end_to_end_then_resume(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "6", "--stop-at", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "metrics" in text and "checkpoint" in text and "bits/byte" in text and "unigram entropy" in text
    assert "sample 'def '" in text and "temperature 0.8, top-k 40" in text
    final = json.loads((out / "summary.json").read_text())["final"]
    bar = _last_bar_line(captured.err)  # the last line shows the final values
    last_loss = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"][-1]["loss"]
    assert "4/6" in bar and f"loss={last_loss:.3f}" in bar and f"val_bpb={final['val_bpb']:.3f}" in bar, bar
    assert (out / "metrics.png").is_file() and (out / "checkpoints" / "4").is_dir()
    # Resuming takes the saved settings; only the given flags change.
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "step 6" in capsys.readouterr().out
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    # The trained model, for use: seqmix.load and seqmix generate (greedy is deterministic; sampling is
    # seeded).
    model = seqmix.load(out)
    assert model.config.mixers == "attn" and model.config.d_model == 32
    outputs = []
    for extra in (["--temperature", "0"], ["--temperature", "0"], ["--seed", "1"], ["--seed", "1"]):
        assert main(["generate", "--out", str(out), "--prompt", "def ", "--max-new-tokens", "8", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert all(o.startswith("def ") for o in outputs) and outputs[0] == outputs[1] and outputs[2] == outputs[3]
    code, err = _exit_code(["generate", "--out", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and "not a seqmix run directory" in err
    code, err = _exit_code(["generate", "--out", str(out), "--prompt", "x", "--temperature", "-1"], capsys)
    assert code == 2 and "temperature must be a number >= 0" in err
    code, err = _exit_code(["train", "--resume", "--out", str(out), "--d-model", "64"], capsys)
    assert code == 2 and "cannot change d_model" in err
    code, err = _exit_code(["train", *TINY, "--steps", "6", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err


def test_few_steps_with_the_default_warmup(capsys, tmp_path):
    """--steps 10 (fewer than the default warmup of 30 would need): the warmup adapts (10% of steps)."""
    no_warmup = [f for i, f in enumerate(TINY) if f != "--warmup" and (i == 0 or TINY[i - 1] != "--warmup")]
    argv = ["train", "--task", "mqar", "--num-kv-pairs", "4", *no_warmup, "--steps", "10", "--out", str(tmp_path)]
    assert main(argv) == 0
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(lrs) == 10 and lrs[0] == max(lrs)  # warmup 1: the first step is at the peak
    code, err = _exit_code(["train", "--steps", "10", "--warmup", "11", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "warmup must be in [0, steps=10]" in err


def test_train_mqar(capsys, tmp_path):
    """Flags given override MQAR's own defaults; the ones not given (seq_len aside) come from them."""
    argv = ["train", "--task", "mqar", *TINY, "--mixers", "gla*2", "--short-conv", "3", "--num-kv-pairs", "4",
            "--steps", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "val accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["train"]["mixers"], saved["train"]["short_conv"], saved["train"]["seq_len"]) == ("gla*2", 3, 32)
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
