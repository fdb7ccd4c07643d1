"""``attention``'s ``cudnn`` implementation on a CPU host: what it accepts and why it refuses the rest,
that it never runs on a CPU target, and fail-closed GPU dispatch (``gpu:device`` only from the recorded
real-GPU results). A GPU target is faked with an abstract H100 mesh (nothing runs: ``explain`` traces)."""

import json

import jax
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.ops import _capabilities, _registry
from seqmix.ops import masks as M
from seqmix.ops.attention_call import prepare_attention
from seqmix.ops.gpu import attention_cudnn as cu
from seqmix.ops.gpu import device_results

H100 = "NVIDIA H100 80GB HBM3"


def _x(t=256, h=2, d=128, dtype=jnp.bfloat16):
    return jnp.ones((1, t, h, d), dtype)


def _gpu_mesh(kind=H100):
    dev = jax.sharding.AbstractDevice(device_kind=kind, num_cores=132, platform="cuda")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)


@pytest.mark.parametrize("kwargs, args", [
    (dict(mask=M.Causal()), {"is_causal": True}),
    (dict(mask=M.LocalWindow(4096)), {"is_causal": True, "local_window_size": (4095, 0)}),
    (dict(), {}),
    (dict(k=_x(h=1), v=_x(h=1)), {}),  # MQA natively
    (dict(q=_x(t=64), mask=None), {}),  # full attention with Tq != S
    (dict(dtype=jnp.float16, mask=M.Causal()), {"is_causal": True}),
])
def test_supported_calls_map_onto_jax_nn(kwargs, args):
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    q, k, v = kwargs.pop("q", _x(dtype=dtype)), kwargs.pop("k", _x(dtype=dtype)), kwargs.pop("v", _x(dtype=dtype))
    call = prepare_attention(q, k, v, **kwargs)
    assert cu.supports(call) is None
    assert cu.mask_arguments(call) == (args, None)


@pytest.mark.parametrize("make, reason", [
    (lambda: prepare_attention(_x(dtype=jnp.float32), _x(dtype=jnp.float32), _x(dtype=jnp.float32)), "float16 or bfloat16"),
    (lambda: prepare_attention(_x(), _x(), _x(d=64)), "v head_dim 64"),
    (lambda: prepare_attention(_x(d=20), _x(d=20), _x(d=20)), "multiple of 8"),
    (lambda: prepare_attention(_x(d=192), _x(d=192), _x(d=192)), "<= 128"),
    (lambda: prepare_attention(_x(), _x(), _x(), return_lse=True), "return_lse"),
    (lambda: prepare_attention(_x(), _x(), _x(), sink_logits=jnp.zeros((2,))), "sink"),
    (lambda: prepare_attention(_x(), _x(), _x(), soft_cap=30.0), "soft cap"),
    (lambda: prepare_attention(_x(), _x(), _x(), segment_ids=jnp.zeros((1, 256), jnp.int32)), "segment_ids"),
    (lambda: prepare_attention(_x(), _x(), _x(), kv_positions=jnp.arange(256)), "explicit positions"),
    (lambda: prepare_attention(_x(t=64), _x(), _x(), mask=M.Causal()), "top-left"),
    (lambda: prepare_attention(_x(), _x(), _x(), mask=M.SlidingWindow(3, 2)), "causal sliding-window"),
    (lambda: prepare_attention(_x(), _x(), _x(), mask=M.ChunkedCausal(64)), "only full"),
    (lambda: prepare_attention(_x(), _x(), _x(), mask=M.streaming(64, 4)), "only full"),
])
def test_refusals_name_the_reason(make, reason):
    got = cu.supports(make())
    assert got is not None and reason in got, got


def test_device_case():
    assert cu.device_case(prepare_attention(_x(h=4), _x(h=2), _x(h=2), mask=M.Causal())) == "bfloat16/causal/gqa/d128"
    assert cu.device_case(prepare_attention(_x(), _x(), _x(), mask=M.LocalWindow(8))) == "bfloat16/window/mha/d128"


def test_named_cudnn_on_cpu_fails_loudly():
    with pytest.raises(NotImplementedError, match="cudnn: needs a GPU target; this trace targets cpu"):
        ops.attention(_x(), _x(), _x(), mask=M.Causal(), impl="cudnn")
    assert "skip cudnn: needs a GPU target" in ops.explain(ops.attention, _x(), _x(), _x(), mask=M.Causal())


def test_gpu_dispatch_is_fail_closed_without_a_recorded_result():
    assert device_results.passed("attention", "cudnn") == []  # the repository records no real-GPU pass yet
    q = _x()
    with jax.sharding.use_abstract_mesh(_gpu_mesh()):
        text = ops.explain(ops.attention, q, q, q, mask=M.Causal())
        named = ops.explain(ops.attention, q, q, q, mask=M.Causal(), impl="cudnn")
    assert "skip cudnn: no real-GPU test result recorded for attention/cudnn" in text, text
    assert "run  xla" in text, text
    assert "run  cudnn (jax.nn.dot_product_attention(implementation='cudnn', is_causal=True))" in named, named


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """Point device_results at a temporary file with the given passes."""

    def write(*entries):
        path = tmp_path / "device_results.json"
        path.write_text(json.dumps({"passed": list(entries)}))
        monkeypatch.setattr(device_results, "RESULTS", path)

    return write


def test_gpu_dispatch_uses_only_recorded_cases(recorded):
    recorded({"family": "attention", "impl": "cudnn", "case": "bfloat16/causal/mha/d128", "device_kind": H100,
              "jax": "0.11.2", "test": "tests/gpu/..."})
    q = _x()
    with jax.sharding.use_abstract_mesh(_gpu_mesh()):
        passed = ops.explain(ops.attention, q, q, q, mask=M.Causal())
        other_case = ops.explain(ops.attention, q, q, q, mask=M.LocalWindow(64))
        unsupported = ops.explain(ops.attention, q, q, q, mask=M.Causal(), soft_cap=5.0)
    with jax.sharding.use_abstract_mesh(_gpu_mesh("NVIDIA A100-SXM4-80GB")):
        other_device = ops.explain(ops.attention, q, q, q, mask=M.Causal())
    assert "run  cudnn" in passed, passed
    assert "case 'bfloat16/window/mha/d128'" in other_case and "run  xla" in other_case, other_case
    assert "skip cudnn: soft cap" in unsupported, unsupported
    assert "not on 'NVIDIA A100-SXM4-80GB'" in other_device and "run  xla" in other_device, other_device
    row = {r["family"]: r for r in _capabilities.capability_rows(["attention"])}["attention"]
    assert row["cudnn"] == "gpu:aot+device"


def test_device_evidence_cannot_be_claimed_in_code():
    with pytest.raises(ValueError, match="comes only from recorded real-GPU results"):
        _registry.Implementation("x", lambda c: c, rank=1, evidence=("gpu:device",))


def test_matrix_has_a_cudnn_column_and_empty_evidence_prints_a_dash():
    from seqmix.ops._capabilities import evidence_cell, impl_columns, shipped_families

    assert impl_columns(shipped_families())[:5] == ("reference", "xla", "pallas_tpu", "pallas_gpu", "cudnn")
    assert evidence_cell(()) == "-"
    rows = {r["family"]: r for r in _capabilities.capability_rows(shipped_families())}
    assert rows["attention"]["cudnn"] == "gpu:aot" and rows["gla"]["cudnn"] == "-"
