"""experiments/bench.py at toy sizes: every row carries its useful FLOPs, the matmul throughput measured
in the same run and the fraction of it; the JSON, tables and plot come out for both suites. Also
experiments/na_bench.py and experiments/op_profile.py at toy sizes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqmix import ops
from seqmix.ops import masks as M

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_script(script: str, *argv: str) -> subprocess.CompletedProcess:
    """An experiments/ script in a subprocess on CPU (for scripts that set XLA flags before JAX starts)."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _run(bench, tmp_path, *argv):
    out = tmp_path / "out.json"
    assert bench.main([*argv, "--repeats", "1", "--matmul-size", "64", "--out", str(out),
                       "--plot", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    return json.loads(out.read_text())


def _check_roofline(result):
    assert set(result["matmul"]) == {"size", "float32", "bfloat16"}
    assert result["matmul"]["float32"]["n"] == 2  # timed with each (length, mode) group
    for row in result["rows"]:
        assert row["useful_flops_per_s"] == pytest.approx(row["useful_flops"] / row["seconds"])
        assert row["fraction_of_matmul"] == pytest.approx(row["useful_flops_per_s"] / row["matmul_flops_per_s"])
        assert row["fraction_of_matmul"] > 0


def test_attention_suite_counts_only_the_window(bench, tmp_path, capsys):
    result = _run(bench, tmp_path, "--lengths", "40", "--mask", "window:16", "--heads", "2", "--kv-heads", "1",
                  "--head-dim", "8", "--block", "16")
    _check_roofline(result)
    rows = result["rows"]
    assert {r["impl"] for r in rows} >= {"seqmix:xla", "seqmix:reference", bench.BASELINE}
    pairs = 16 * 40 - 16 * 15 // 2  # a causal window of 16 keys over 40 queries
    fwd = 2 * 2 * (8 + 8) * pairs
    for r in rows:
        assert r["useful_flops"] == (fwd if r["mode"] == "fwd" else fwd * (1 + ops.BACKWARD_FLOPS))
        assert r["mask"] == "window:16" and r["block"] == 16 and "ratio_to_baseline" in r
    assert "of matmul" in capsys.readouterr().out


def test_recurrent_suite(bench, tmp_path, capsys):
    result = _run(bench, tmp_path, "--suite", "recurrent", "--lengths", "40", "--families", "simple_gla",
                  "--heads", "2", "--head-dim", "8", "--max-reference-len", "40")
    _check_roofline(result)
    assert {(r["family"], r["impl"]) for r in result["rows"]} == {
        ("simple_gla", "seqmix:xla"), ("simple_gla", "seqmix:reference"), ("attention", "seqmix:xla")}
    assert "%)" in capsys.readouterr().out  # the scaling table shows the fraction beside each time


def test_candidates_are_timed_in_turns(bench):
    """A group's candidates run round-robin, so a drift in the machine's speed hits them alike: each round
    calls each candidate twice in a row (untimed, to refill its caches, then timed)."""
    calls = []
    runs = [(lambda name=name: calls.append(name), ()) for name in "abc"]
    assert len(bench._round_robin(runs, 3)) == 3
    assert calls == list("aabbcc") * 3


def test_mask_argument(bench):
    assert bench.parse_mask("causal") == M.Causal() and bench.parse_mask("full") is None
    assert bench.parse_mask("window:7") == M.LocalWindow(7)
    with pytest.raises(Exception, match="window:W"):
        bench.parse_mask("window")


def test_neighborhood_bench_at_toy_size(tmp_path):
    """experiments/na_bench.py: every candidate timed per mode, tile fractions from the table and from the
    block metadata (which may over-count non-empty tiles, never under-count), JSON, table and plot."""
    spec = importlib.util.spec_from_file_location("na_bench", ROOT / "experiments" / "na_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "na.json"
    assert mod.main(["--grids", "16", "--kernel", "3", "--block", "16", "--tile", "4", "4", "--repeats", "1",
                     "--matmul-size", "64", "--out", str(out), "--plot", str(tmp_path / "na.png")]) == 0
    result = json.loads(out.read_text())
    assert {(r["impl"], r["mode"]) for r in result["rows"]} == {
        (i, m) for i in ("neighborhood_attention", "attention + Explicit", "attention (full)") for m in ("fwd", "fwd+bwd")}
    (tile,) = result["tiles"]
    assert tile["allowed_fraction"] == pytest.approx(9 / 256)  # every query sees exactly 3×3 keys
    assert tile["row_major_metadata"]["non_empty"] >= tile["row_major"]["non_empty"] > 0
    assert tile["row_major"]["non_empty"] < 1 and tile["tile_major"]["non_empty"] < 1
    assert (tmp_path / "na.png").stat().st_size > 10_000


def test_op_profile_at_toy_size(tmp_path):
    """experiments/op_profile.py (a subprocess: it sets XLA's trace flag before JAX starts): the per-instruction
    times of one compiled call, matmuls recognized, control flow kept out of the sum, JSON written."""
    out = tmp_path / "profile.json"
    proc = _run_script("op_profile.py", "--family", "simple_gla", "--seq", "128", "--heads", "2", "--head-dim", "16",
                       "--repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["family"] == "simple_gla" and result["mode"] == "fwd+bwd" and result["wall_seconds"] > 0
    assert result["by_kind"].get("matmul", 0) > 0  # the chunk dots were traced and recognized
    assert result["instruction_seconds"] == pytest.approx(sum(result["by_kind"].values()))
    assert all(o["opcode"] not in ("while", "conditional", "call") for o in result["top"])
    assert "| matmul |" in proc.stdout
    assert 0 < result["useful_flops"] <= result["dot_flops"]  # the algorithm's dots cover its useful work


def test_dot_flops_counts_every_loop_iteration(monkeypatch):
    """op_profile.dot_flops on a compiled program: a dot at top level and one in a 3-step scan are 4 dots."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # op_profile appends its trace flag on import
    spec = importlib.util.spec_from_file_location("op_profile", ROOT / "experiments" / "op_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def f(a, b, xs):
        def body(c, x):
            return c + jnp.tanh(x @ b), None

        return jax.lax.scan(body, a @ b, xs)[0]

    a, b = jnp.ones((4, 8)), jnp.ones((8, 5))
    text = jax.jit(f).lower(a, b, jnp.ones((3, 4, 8))).compile().as_text()
    assert mod.dot_flops(text) == 4 * (2 * 4 * 8 * 5)


def test_tile_probe_at_toy_size(tmp_path):
    """experiments/xla_tiles_probe.py: every candidate timed forward and fwd+bwd, the policy's own choice
    marked (at most one), JSON written."""
    spec = importlib.util.spec_from_file_location("xla_tiles_probe", ROOT / "experiments" / "xla_tiles_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.probe("window:16", 64, [(16, 16), (32, 16)], 1, h=2, d=8)
    assert [(r["block_q"], r["block_kv"]) for r in rows] == [(16, 16), (32, 16)]
    assert sum(r["chosen"] for r in rows) <= 1
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and 0 < r["band_fill"] <= 1 for r in rows)


def test_parallel_bench_at_toy_size(tmp_path):
    """experiments/bench_parallel.py through ``bench.py --parallel`` (a subprocess: it forces the host device
    count before JAX starts), every other argument passed on: the recurrent strategies' measured collective
    bytes next to the formula, JSON written where --out says."""
    out = tmp_path / "parallel.json"
    proc = _run_script("bench.py", "--parallel", "--devices", "2", "--seq", "64", "--suite", "recurrent",
                       "--families", "simple_gla", "--heads", "2", "--kv-heads", "2", "--head-dim", "16", "--repeats",
                       "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"lasp2:simple_gla", "lasp1:simple_gla"}
    assert rows["lasp1:simple_gla"]["fwd_bytes"] == rows["lasp1:simple_gla"]["formula_fwd_bytes"] > 0
    assert rows["lasp2:simple_gla"]["fwd_collectives"] == {"all-gather": 1}


@pytest.mark.slow  # two worker processes start JAX
def test_revision_ab_times_both_arms_on_the_same_inputs(tmp_path):
    out = tmp_path / "ab.json"
    proc = _run_script("revision_ab.py", "--base", "HEAD", "--rounds", "2", "--only", "simple_gla xla fwd T=1024",
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["family"], r["impl"], r["mode"], r["T"]) for r in rows] == [("simple_gla", "xla", "fwd", 1024)]
    (row,) = rows
    assert len(row["base_seconds"]) == len(row["head_seconds"]) == 2
    assert row["head_over_base"] == row["head_best"] / row["base_best"] > 0
    assert row["same_program"]  # HEAD against this tree: simple_gla's forward is the same compiled program
    assert "| simple_gla xla fwd T=1024 |" in proc.stdout
