"""The trainer: outputs of a run, resume reproducing the uninterrupted loss curve, bad configs, pieces."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.train.checkpoint import Checkpointer, from_nested_dict, to_nested_dict
from seqmix.train.config import TrainConfig, merge_for_resume, parse_mesh
from seqmix.train.metrics import MetricsWriter, plot_metrics, read_metrics
from seqmix.train.trainer import learning_rate_schedule, masked_loss, prepare, train

# One tiny config for every run here: the jitted programs are cached per (model, optimizer, mesh),
# so the runs below compile once.
TINY = TrainConfig(d_model=32, num_heads=2, mixers="attn", seq_len=32, batch_size=4, steps=12, warmup=2,
                   log_every=1, eval_every=6, ckpt_every=4, eval_batches=2, sample_len=0)


def test_run_outputs_and_resume_matches_uninterrupted(tmp_path):
    straight = train(TINY.replace(out=str(tmp_path / "a")), progress=False)
    out = straight.out
    for name in ("metrics.jsonl", "metrics.png", "config.json", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert straight.checkpoint_path == out / "checkpoints" / "12" and straight.checkpoint_path.is_dir()
    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(train_lines[-1])
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"val_loss", "val_bpb"} <= set(evals[-1])
    assert abs(evals[-1]["val_bpb"] - evals[-1]["val_loss"] / math.log(2)) < 1e-9
    losses = straight.train_losses
    assert losses[12] < losses[1]  # it learns something even in 12 steps
    summary = json.loads((out / "summary.json").read_text())
    assert 3.5 < summary["unigram_entropy_bpb"] < 6 and summary["final"]["val_bpb"] == evals[-1]["val_bpb"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["d_model"] == 32 and saved["model"]["vocab_size"] == 256

    # Interrupted after step 6 (schedule still spanning 12 steps), then resumed: same losses 7..12.
    cfg_b = TINY.replace(out=str(tmp_path / "b"))
    first = train(cfg_b, stop_at=6, progress=False)
    assert first.checkpoint_path.name == "6" and max(first.train_losses) == 6
    resumed = train(cfg_b, resume=True, progress=False)
    assert sorted(resumed.train_losses) == list(range(7, 13))
    np.testing.assert_allclose([resumed.train_losses[s] for s in range(7, 13)],
                               [losses[s] for s in range(7, 13)], rtol=1e-6, atol=1e-6)
    assert abs(resumed.final["val_loss"] - straight.final["val_loss"]) < 1e-5
    steps_b = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps_b == list(range(1, 13))  # one curve, no duplicated steps

    # Guards: checkpoints without --resume, changed model on resume, nothing to resume.
    with pytest.raises(ValueError, match="already holds checkpoints"):
        prepare(cfg_b)
    with pytest.raises(ValueError, match="cannot change d_model"):
        prepare(cfg_b.replace(d_model=64), resume=True)
    with pytest.raises(ValueError, match="cannot resume"):
        prepare(TINY.replace(out=str(tmp_path / "c")), resume=True)


@pytest.mark.parametrize("changes,match", [
    ({"mixers": "attn,nope"}, "unknown mixer 'nope'"),
    ({"mixers": "swa"}, "positive integer argument"),
    ({"mesh": "data=2"}, "needs 2 devices"),
    ({"mesh": "batch=1"}, "bad mesh entry"),
    ({"task": "mqar", "seq_len": 20, "num_kv_pairs": 8}, "too short for num_kv_pairs=8"),
    ({"task": "words"}, "unknown task"),
    ({"warmup": 50, "steps": 10}, "warmup"),
    ({"d_model": 30, "num_heads": 4}, "not divisible"),
    ({"dtype": "float8"}, "dtype"),
    ({"lr": -1.0}, "lr"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_configs_raise(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        prepare(TINY.replace(out=str(tmp_path), **changes))


def test_task_defaults():
    """``for_task`` applies the task's own defaults (MQAR: the Zoology setting), then the fields given."""
    assert TrainConfig.for_task("bytes") == TrainConfig() and TrainConfig().mixers == "attn*2"
    mqar_cfg = TrainConfig.for_task("mqar")
    assert (mqar_cfg.task, mqar_cfg.seq_len, mqar_cfg.num_kv_pairs, mqar_cfg.mixers) == ("mqar", 64, 8, "attn*2")
    assert TrainConfig.for_task("mqar", seq_len=128, mixers="gla").seq_len == 128
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig.for_task("words")


def test_resume_merge_rules():
    saved = TINY.replace(out="x")
    assert merge_for_resume(saved, {"steps": 20, "out": "x"}).steps == 20
    with pytest.raises(ValueError, match="cannot change lr"):
        merge_for_resume(saved, {"lr": 1.0})
    assert TrainConfig.from_dict(saved.to_dict()) == saved
    with pytest.raises(ValueError, match="unknown TrainConfig fields: bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_parse_mesh():
    assert parse_mesh("") == {"data": 1, "fsdp": 1, "seq": 1, "tensor": 1}
    assert parse_mesh("data=2, seq=4", 8) == {"data": 2, "fsdp": 1, "seq": 4, "tensor": 1}
    assert parse_mesh("data=-1,tensor=2", 8)["data"] == 4
    for spec, match in [("data=2,data=2", "twice"), ("seq=x", "integer"), ("seq=0", ">= 1"),
                        ("data", "AXIS=SIZE"), ("data=-1,seq=-1", "only one axis")]:
        with pytest.raises(ValueError, match=match):
            parse_mesh(spec, 8)
    with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
        parse_mesh("data=3,seq=2", 8)


def test_masked_loss_and_schedule():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = jnp.array([[0, 2]])
    loss, sums = masked_loss(logits, targets, jnp.array([[1.0, 0.0]]))
    assert abs(float(loss) - math.log(2)) < 1e-6 and float(sums["correct"]) == 1 and float(sums["count"]) == 1
    loss, sums = masked_loss(logits, targets, jnp.array([[1.0, 1.0]]))
    assert abs(float(loss) - (math.log(2) + math.log(10)) / 2) < 1e-5 and float(sums["correct"]) == 1
    assert float(masked_loss(logits, targets, jnp.zeros((1, 2)))[0]) == 0.0  # no NaN on an empty mask
    sched = learning_rate_schedule(TrainConfig(lr=1e-3, warmup=10, steps=100, min_lr_ratio=0.1))
    assert abs(float(sched(0)) - 1e-4) < 1e-9 and abs(float(sched(10)) - 1e-3) < 1e-9
    assert abs(float(sched(100)) - 1e-4) < 1e-9 and float(sched(50)) < 1e-3


def test_checkpoint_roundtrip_keeps_containers(tmp_path):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tree = {"params": nnx.state(model, nnx.Param), "count": jnp.int32(5), "stack": (jnp.ones(2), [jnp.zeros(1)])}
    nested = to_nested_dict(tree)
    assert set(nested["params"]) == {"kernel", "bias"}
    back = from_nested_dict(nested, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    with Checkpointer(tmp_path / "ck", max_to_keep=1) as ck:
        ck.save(1, tree, {"step": 1})
        ck.save(2, jax.tree.map(lambda x: x + 1, tree), {"step": 2, "note": "x"})
        assert ck.all_steps() == [2]
        restored, meta = ck.restore(jax.tree.map(jnp.zeros_like, tree))
    assert meta == {"step": 2, "note": "x"} and int(restored["count"]) == 6
    np.testing.assert_array_equal(restored["params"]["kernel"][...], tree["params"]["kernel"][...] + 1)
    with pytest.raises(ValueError, match="no array at"):
        from_nested_dict({"params": {}}, tree)


def test_metrics_writer_truncates_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as w:
        for step in (1, 2, 3):
            w.write({"kind": "train", "step": step, "loss": float(step), "x": float("nan")})
        w.write({"kind": "eval", "step": 3, "val_loss": 1.0, "val_acc": 0.5})
    assert read_metrics(path)[0]["x"] is None
    with MetricsWriter(path, truncate_after=2) as w:
        w.write({"kind": "train", "step": 3, "loss": 9.0})
    records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 9.0)]
    png = plot_metrics(records, tmp_path / "m.png", metric="val_acc", baseline=0.1)
    assert png.stat().st_size > 1000


def test_bfloat16_compute_keeps_fp32_params(tmp_path):
    cfg = TINY.replace(dtype="bfloat16", steps=3, eval_every=3, ckpt_every=3, out=str(tmp_path))
    result = train(cfg, progress=False)
    assert all(math.isfinite(v) for v in result.train_losses.values())
    assert result.model.config.dtype == "bfloat16"
    params = nnx.state(result.model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert result.model(jnp.zeros((1, 8), jnp.int32)).dtype == jnp.float32
