"""``LM(config, sequence_parallel=SequenceParallel(mesh, ...))`` equals the single-device ``LM`` (fp32).

The hybrid ``"attn,swa:16,gdn,gla"`` (and every other shipped mixer family in one more case) on 8 forced
CPU devices (a subprocess: ``sp_model_worker``):
softmax layers by all-gather / ring / Ulysses, recurrent layers by LASP-2, with packed segments and a
zigzag layout; gradients too for the LASP-2H case. In-process checks of the plumbing and the errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = ["seq8_allgather", "seq8_ring_segments", "data2_seq4_ulysses", "seq4_zigzag_segments", "seq4_other_families"]


@pytest.fixture(scope="module")
def worker_records():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.parallel.sp_model_worker", *CASES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    recs = {}
    for line in proc.stdout.splitlines():
        if line.startswith("SPMODEL "):
            rec = json.loads(line[len("SPMODEL "):])
            recs[rec["id"]] = rec
    return recs, (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_lm_sequence_parallel_matches_single_device(worker_records, case):
    recs, log = worker_records
    assert case in recs, f"no record for {case}; worker output tail:\n{log}"
    rec = recs[case]
    assert rec["ok"], rec.get("error")
    assert rec["fwd_max_abs"] <= 1e-4 * max(rec["fwd_scale"], 1.0), rec
    if "grad_max_rel" in rec:
        assert rec["grad_max_rel"] <= 1e-3, rec


def test_sequence_parallel_config_and_plumbing():
    import jax
    from flax import nnx

    from seqmix.models import LM, LMConfig
    from seqmix.models import mixers as mixers_lib
    from seqmix.nn import Attention
    from seqmix.parallel import SequenceParallel, make_mesh

    mesh = make_mesh({"seq": 1}, devices=jax.devices()[:1])
    sp = SequenceParallel(mesh)
    assert (sp.strategy, sp.recurrent_strategy, sp.size) == ("allgather", "lasp2", 1)
    assert hash(sp) == hash(SequenceParallel(mesh))  # a static, hashable graph attribute
    with pytest.raises(ValueError, match="strategy must be one of"):
        SequenceParallel(mesh, strategy="nope")
    with pytest.raises(ValueError, match="has no axis 'data'"):
        SequenceParallel(mesh, axis="data")
    with pytest.raises(ValueError, match="sequence_parallel must be"):
        Attention(8, 2, sequence_parallel="seq", rngs=nnx.Rngs(0))

    cfg = LMConfig(vocab_size=16, d_model=16, num_heads=2, mixers="attn,swa:4,gdn,gla,based:4", max_len=16)
    lm = LM(cfg, rngs=nnx.Rngs(0), sequence_parallel=sp)
    mixers = [b.mixer for b in lm.blocks]
    assert all(m.sequence_parallel is sp for m in mixers[:4])
    assert mixers[4].linear.sequence_parallel is sp and mixers[4].window_attn.sequence_parallel is sp
    assert LM(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer.sequence_parallel is None

    # A factory written for the plain protocol still builds; asked for SP it says it cannot.
    mixers_lib.register_mixer("plain_attn_test", lambda c, a, *, rngs: Attention(c.d_model, c.num_heads, rngs=rngs),
                              replace=True)
    try:
        assert mixers_lib.build_mixer(cfg, "plain_attn_test", None, rngs=nnx.Rngs(0)).sequence_parallel is None
        with pytest.raises(ValueError, match="does not support sequence parallelism"):
            mixers_lib.build_mixer(cfg, "plain_attn_test", None, rngs=nnx.Rngs(0), sequence_parallel=sp)
    finally:
        mixers_lib.MIXERS.pop("plain_attn_test", None)


# ----------------------------------------------------------------------------- the trainer

TRAIN_CASES = ["seq=8:allgather", "data=2,seq=4:ring"]


def _train_worker(num_devices: int, out_dir: Path, cases: list[str]) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "tests.parallel.sp_train_worker", str(num_devices), str(out_dir),
                             *cases], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(proc: subprocess.Popen) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=1200)
    recs = {}
    for line in out.splitlines():
        if line.startswith("SPTRAIN "):
            rec = json.loads(line[len("SPTRAIN "):])
            recs[rec["id"]] = rec
    return recs, out[-4000:]


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp_train")
    ref = _train_worker(1, tmp / "one", [":allgather"])  # the single-device reference, 1 CPU device
    par = _train_worker(8, tmp / "eight", [*TRAIN_CASES, "errors"])
    ref_recs, ref_log = _records(ref)
    par_recs, par_log = _records(par)
    return ref_recs, par_recs, ref_log + "\n----\n" + par_log


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAIN_CASES)
def test_trainer_sequence_parallel_matches_one_device(train_records, case):
    """``seqmix train --mesh seq=8`` (and ``data=2,seq=4``) of ``attn,gdn`` on the bytes task: the loss
    curve of 10 steps equals the single-device run's."""
    import numpy as np

    ref_recs, par_recs, log = train_records
    ref, rec = ref_recs.get(":allgather"), par_recs.get(case)
    assert ref is not None and rec is not None, f"missing records; worker output:\n{log}"
    assert ref["ok"], ref.get("error")
    assert rec["ok"], rec.get("error")
    mesh, _, strategy = case.rpartition(":")
    assert ref["sp"] is None
    assert rec["sp"] == {"axis": "seq", "size": int(mesh.split("seq=")[1]), "softmax": strategy,
                         "recurrent": "lasp2", "layout": "contiguous"}
    assert {k: v for k, v in rec["mesh"].items() if v > 1} == dict(
        (a, int(n)) for a, n in (part.split("=") for part in mesh.split(",")))
    steps = [str(s) for s in range(1, 11)]
    assert sorted(rec["losses"], key=int) == steps
    np.testing.assert_allclose([rec["losses"][s] for s in steps], [ref["losses"][s] for s in steps], rtol=1e-4)
    np.testing.assert_allclose(rec["val_loss"], ref["val_loss"], rtol=1e-4)
    assert rec["losses"]["10"] < rec["losses"]["1"]


@pytest.mark.slow
def test_trainer_sequence_parallel_errors(train_records):
    _, par_recs, log = train_records
    assert "errors" in par_recs, f"no record; worker output:\n{log}"
    errors = par_recs["errors"]["errors"]
    assert "seq_len=36" in errors["indivisible"] and "divisible by the 'seq' mesh axis size 8" in errors["indivisible"]
    assert "zigzag" in errors["zigzag"] and "divisible by 16" in errors["zigzag"]
    assert "ulysses" in errors["ulysses_heads"] and "divisible by 8" in errors["ulysses_heads"]


def test_sp_flags_parse():
    import argparse

    from seqmix.train.config import TrainConfig, add_train_arguments, overrides_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--mesh", "seq=8", "--sp-strategy", "ring", "--sp-layout", "zigzag"])
    cfg = TrainConfig(**overrides_from_args(args))
    assert (cfg.mesh, cfg.sp_strategy, cfg.sp_layout) == ("seq=8", "ring", "zigzag")
    assert TrainConfig().sp_strategy == "allgather"
    with pytest.raises(SystemExit):
        parser.parse_args(["--sp-strategy", "lasp3"])
    with pytest.raises(ValueError, match="sp_strategy"):
        TrainConfig(sp_strategy="nope").validate()
