"""experiments/gpu_device_run.py's whole flow at tiny shapes on CPU (``--cpu-smoke``): conformance, the
recorded device results (the format ``seqmix.ops.gpu.device_results`` reads), the benchmark JSON and
table (attention at one mask, and simple_gla: the test stays under 30 s). Two stand-in implementations
named like GPU kernels are registered for the run (``pallas_gpu_standin``: xla's function with a
``device_case``; ``pallas_gpu_standin_broken``: its output scaled by 1.05; backend None, so both run on
CPU): the run must discover them with no edit, record a pass per case key, and record the wrong kernel
as failed, never as passed."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import jax
import pytest

from seqmix import ops
from seqmix.ops import _registry
from seqmix.ops.gpu import device_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the script's modules, as the script itself finds them
from gpu_device import budget, cases, common, conformance  # noqa: E402

ENTRY_KEYS = {"family", "impl", "case", "device_kind", "jax", "test"}
ROW_KEYS = {"family", "impl", "shape", "dtype", "mask", "mode", "status", "useful_flops"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_device_run", ROOT / "experiments" / "gpu_device_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _case(call) -> str:
    return f"{call.q.dtype.name}/{'gqa' if call.groups > 1 else 'mha'}"


@pytest.fixture(scope="module")
def stand_ins():
    fam = ops.get_family("attention")
    xla = fam.implementations["xla"].fn

    def broken(call):
        return jax.tree_util.tree_map(lambda x: x * 1.05, xla(call))

    added = [_registry.Implementation("pallas_gpu_standin", xla, rank=5, evidence=(), auto=False, device_case=_case),
             _registry.Implementation("pallas_gpu_standin_broken", broken, rank=6, evidence=(), auto=False)]
    for impl in added:
        _registry.register_implementation("attention", impl)
    try:
        yield added
    finally:
        for impl in added:
            fam.implementations.pop(impl.name, None)


@pytest.fixture(scope="module")
def run(script, stand_ins, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_device_run")
    assert script.main(["--cpu-smoke", "--out", str(out), "--families", "attention", "simple_gla",
                        "--masks", "window:4096", "--reps", "1", "--no-watchdog"]) == 0
    return out, {name: json.loads((out / name).read_text())
                 for name in ("device_results.json", "gpu_conformance.json", "gpu_bench.json")}


def test_device_results_keep_the_committed_format(run):
    out, files = run
    doc = files["device_results.json"]
    committed = json.loads(device_results.RESULTS.read_text())
    assert doc["about"] == committed["about"] and "never copy" in doc["smoke"]
    assert all(set(e) == ENTRY_KEYS for e in doc["passed"])
    mine = {(e["impl"], e["case"]) for e in doc["passed"] if e["device_kind"] == "cpu"}
    assert {("pallas_gpu_standin", "bfloat16/mha"), ("pallas_gpu_standin", "float16/gqa"), ("xla", "*")} <= mine
    assert not any(impl == "pallas_gpu_standin_broken" for impl, _ in mine)  # a failure is never a pass
    assert not any(e["impl"] in ("cudnn", "pallas_gpu") for e in doc["passed"] if e["device_kind"] == "cpu")
    # the dispatch's own reader accepts the file and answers from it
    path = out / "device_results.json"
    assert device_results.problem("attention", "pallas_gpu_standin", "bfloat16/mha", "cpu", path) is None
    assert "float16/mha" in device_results.problem("attention", "pallas_gpu_standin", "float16/mha", "cpu", path)
    assert device_results.problem("attention", "pallas_gpu_standin_broken", None, "cpu", path)


def test_conformance_lists_every_case(run):
    _, files = run
    conf = files["gpu_conformance.json"]
    assert conf["finished"] and conf["env"]["device_kind"] == "cpu"
    by_impl = {}
    for c in conf["cases"]:
        assert c["status"] in ("passed", "failed", "skipped")
        by_impl.setdefault((c["family"], c["impl"]), []).append(c)
    assert {c["status"] for c in by_impl[("attention", "cudnn")]} == {"skipped"}
    assert all("GPU target" in c["reason"] for c in by_impl[("attention", "cudnn")])  # skipped with its reason
    for c in by_impl.get(("attention", "pallas_gpu"), []):  # the Mosaic GPU kernels, once registered
        assert c["status"] == "skipped" and c["reason"]
    assert {c["status"] for c in by_impl[("attention", "pallas_gpu_standin")]} == {"passed"}
    broken = by_impl[("attention", "pallas_gpu_standin_broken")]
    assert {c["status"] for c in broken} == {"failed"} and all("rms" in c["error"] for c in broken)
    assert [i["why"] for i in conf["incomplete"]] == ["a call failed"]
    assert {c["status"] for c in by_impl[("simple_gla", "xla")]} == {"passed"}
    assert conf["summary"]["failed"] == len(broken)


def test_benchmark_rows(run):
    out, files = run
    bench = files["gpu_bench.json"]
    rows = bench["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    attention = [r for r in rows if r["family"] == "attention"]
    assert {(r["mask"], r["mode"]) for r in attention} == {("window:4096", "fwd"), ("window:4096", "fwd+bwd")}
    b, t, h, d = attention[0]["shape"]
    w = 4096 * t // 8192  # the smoke run scales the window with T
    pairs = b * (w * t - w * (w - 1) // 2)
    assert {r["useful_flops"] for r in attention if r["mode"] == "fwd"} == {2.0 * h * 2 * d * pairs}
    status = {(r["impl"], r["mask"], r["mode"]): r["status"] for r in attention}
    assert {s for (impl, _, _), s in status.items() if impl == "cudnn"} == {
        "skipped: needs a GPU target; this trace targets cpu"}
    assert {s for (i, _, _), s in status.items() if i == "pallas_gpu"} <= {"not registered"} | {
        s for s in status.values() if s.startswith("skipped: ")}
    for impl in ("xla", "pallas_gpu_standin", "pallas_gpu_standin_broken"):  # discovered kernels get rows too
        assert {s for (i, _, _), s in status.items() if i == impl} == {"ok"}
    for r in attention:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] == pytest.approx(r["useful_flops"] / r["ms"] / 1e9)
            if r["impl"] == "pallas_gpu_standin_broken":
                assert r["vs_xla_error"]["rms"] > 0.01
    gla = {r["impl"]: r["status"] for r in rows if r["family"] == "simple_gla"}
    assert gla["xla"] == "ok" and gla["fla"].startswith("skipped:")
    assert gla["pallas_gpu"] == "not registered" or gla["pallas_gpu"].startswith("skipped: ")
    assert list(gla)[-1] == "pallas_gpu@stages=1" and gla["pallas_gpu@stages=1"] == gla["pallas_gpu"]  # after fla
    assert bench["fla_checks"]["simple_gla"]["status"].startswith("skipped:")
    table = (out / "gpu_bench.md").read_text()
    assert "| family | impl | shape | dtype | mask | mode | ms | TF/s |" in table
    body = [line for line in table.splitlines() if line.startswith("| ") and line.count(" | ") == 9]
    assert len(body) == len(rows) + 1  # the header and one line per row


def test_no_gpu_without_smoke_is_refused(script, tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the full run would start")
    assert script.main(["--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_tile_variants_trace_under_their_tiles():
    """A VARIANTS candidate's tiles hold while it is traced and compiled, and are restored after: the recurrent
    kernels' input ring at depth 1 against the default 2."""
    from gpu_device import bench as device_bench

    from pallas_kernels.gpu import gated_linear as gl
    from seqmix.ops.gpu import recurrent

    default = gl.H100_TILES
    assert default.stages == 2 and common.VARIANTS["pallas_gpu@stages=1"] == ("pallas_gpu", {"stages": 1})
    with device_bench.gpu_tiles(stages=1):
        assert recurrent._tiles(None) == dataclasses.replace(default, stages=1)
    assert gl.H100_TILES is default and recurrent._tiles(None) is default


def test_spec_implementations_are_named_once():
    assert len(set(common.ATTENTION_SPEC["impls"])) == len(common.ATTENTION_SPEC["impls"])
    assert set(common.FLA_OPS) == set(common.RECURRENT_SPEC["families"])
    assert dataclasses.is_dataclass(cases.Case)


def test_recording_rule_and_merge(tmp_path, monkeypatch):
    """A key is recorded when a call passed and none failed (budget cuts are named); the committed entries of
    a (family, impl) tested here are replaced on this device kind only."""
    committed = tmp_path / "committed.json"
    committed.write_text(json.dumps({"about": "x", "passed": [
        dict(family="attention", impl="cudnn", case="old", device_kind="H", jax="0", test="t"),
        dict(family="attention", impl="cudnn", case="old", device_kind="other", jax="0", test="t"),
        dict(family="gla", impl="pallas_gpu", case="*", device_kind="H", jax="0", test="t")]}))
    monkeypatch.setattr(device_results, "RESULTS", committed)
    out = budget.Output(tmp_path, smoke=False)
    err = {"o": {"rms": 1e-3, "rmax": 0, "max_abs": 0}}

    def case(key, status, desc="c: T=1"):
        return dict(family="attention", impl="cudnn", case=desc, tier=1, key=key, status=status, versus="reference",
                    errors=err if status == "passed" else {})

    out.cases = [case("a", "passed"), case("a", "skipped", "c: T=2"), case("b", "passed"), case("b", "failed"),
                 case("c", "skipped"), case(None, "skipped")]
    conformance.record_results(out, "H", smoke=False)
    assert [(e["case"], e["device_kind"]) for e in out.recorded] == [("a", "H")]
    assert "1 more not run (time budget)" in out.recorded[0]["test"]
    assert {i["case"]: i["why"] for i in out.incomplete} == {"b": "a call failed", "c": "no call ran (time budget)"}
    passed = out.results_doc["passed"]
    assert {(e["impl"], e["case"], e["device_kind"]) for e in passed} == {
        ("cudnn", "a", "H"), ("cudnn", "old", "other"), ("pallas_gpu", "*", "H")}
    assert out.results_doc["about"] == "x" and "smoke" not in out.results_doc
