"""Ahead-of-time compilation of ring attention and LASP-2 for a 4-chip TPU v5e topology (DESIGN.md §5, §6).

The worker (``tests/parallel/tpu_aot_worker.py``) runs the TPU compiler on this machine. It needs
libtpu: install the ``tpu`` extra (or set ``SEQMIX_LIBTPU_PATH`` to a directory holding an unpacked
``libtpu`` package); the tests skip cleanly otherwise.
"""

import pytest

from tests.parallel.sp_cases import assert_case_ok

SP_SUITES = ("tpu_aot",)
pytestmark = pytest.mark.tpu_compile


def _result(sp_suites, name):
    rec = sp_suites.record("tpu_aot", name)
    assert_case_ok(rec)
    return rec["result"]


def test_ring_attention_compiles_for_v5e_2x2(sp_suites):
    fwd = _result(sp_suites, "ring_fwd")
    assert fwd["platform"] == "tpu" and fwd["devices"] == 4 and fwd["unknown_trip_counts"] == 0, fwd
    # dispatch knows it traces for a TPU inside the ring's shard_map: the Pallas flash kernel, not XLA
    assert "seqmix_flash_fwd" in fwd["mosaic_kernels"], fwd["mosaic_kernels"]
    # k, v and kv positions rotate P - 1 = 3 times; nothing is gathered
    assert fwd["count"] == {"collective-permute": 9}, fwd
    kv_bytes = 2 * 1 * 1024 * 4 * 128 * 2 * 3 / 4  # 2·B·N·H_kv·d·bytes·(P−1)/P (FAMILIES.md §4.9)
    assert kv_bytes <= fwd["bytes_sent"]["collective-permute"] <= kv_bytes * 1.01, fwd
    both = _result(sp_suites, "ring_fwd_bwd")
    assert {"seqmix_flash_fwd", "seqmix_flash_dq", "seqmix_flash_dkv"} <= set(both["mosaic_kernels"]), both
    # backward: k, v, positions rotate again (9) and fp32 dk, dv go P = 4 hops each (8)
    assert both["count"] == {"collective-permute": 9 + 9 + 8}, both


def test_lasp2_compiles_for_v5e_2x2(sp_suites):
    fwd = _result(sp_suites, "lasp2_gdn_fwd")
    assert fwd["platform"] == "tpu"
    assert "seqmix_delta_fwd" in fwd["mosaic_kernels"], fwd["mosaic_kernels"]
    # one collective: the summaries' all-gather (the TPU compiler may lower it as an all-reduce)
    assert sum(fwd["count"].values()) == 1 and set(fwd["count"]) <= {"all-gather", "all-reduce"}, fwd
    both = _result(sp_suites, "lasp2_gdn_fwd_bwd")
    assert {"seqmix_delta_fwd", "seqmix_delta_bwd"} <= set(both["mosaic_kernels"]), both
    assert "collective-permute" not in both["count"] and "all-to-all" not in both["count"], both
    assert sum(both["count"].values()) <= 3, both  # gather, its transpose, d initial_state's sum
