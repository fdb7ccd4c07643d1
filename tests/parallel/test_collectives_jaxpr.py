"""The collectives each strategy issues, read from its jaxpr (FAMILIES.md §4.9, §5.4 item 12).

Counts are executions per device: a collective inside a ``lax.scan`` counts once per iteration. The
worker traces bf16 inputs, so the ring's rotated k/v (bf16) and its fp32 dk/dv accumulators differ.
"""

import pytest

from tests.parallel.sp_cases import JAXPR, assert_case_ok

SP_SUITES = ("jaxpr",)


def _result(sp_suites, case_id):
    rec = sp_suites.record("jaxpr", case_id)
    assert_case_ok(rec)
    return rec["result"]


def _by_prim(counts, prim):
    return {k.split(" ", 1)[1]: v for k, v in counts.items() if k.split(" ", 1)[0] == prim}


@pytest.mark.parametrize("p", [2, 4, 8])
def test_ring_rotates_each_kv_tensor_p_minus_1_times(sp_suites, p):
    res = _result(sp_suites, f"ring-p{p}")
    sh = res["shapes"]
    kv = f"bfloat16{[sh['b'], sh['n'], sh['hkv'], sh['d']]}"
    acc = f"float32{[sh['b'], sh['n'], sh['hkv'], sh['d']]}"
    pos, seg = f"int32{[sh['n']]}", f"int32{[sh['b'], sh['n']]}"
    fwd = res["forward"]
    # k and v share a shape: 2 tensors x (P - 1) hops; positions and segment ids: P - 1 hops each.
    assert fwd == {f"ppermute {kv}": 2 * (p - 1), f"ppermute {pos}": p - 1, f"ppermute {seg}": p - 1}, fwd
    total = res["total"]
    bwd = {k: total[k] - fwd.get(k, 0) for k in total if total[k] - fwd.get(k, 0)}
    # backward: k, v (and their metadata) rotate again (P - 1 hops); fp32 dk, dv take P hops (home).
    assert bwd == {f"ppermute {kv}": 2 * (p - 1), f"ppermute {pos}": p - 1, f"ppermute {seg}": p - 1,
                   f"ppermute {acc}": 2 * p}, bwd


@pytest.mark.parametrize("case_id", [c["id"] for c in JAXPR if c["kind"] == "lasp2"])
def test_lasp2_one_all_gather_and_no_q_gather(sp_suites, case_id):
    res = _result(sp_suites, case_id)
    fwd, total = res["forward"], res["total"]
    gathers = _by_prim(fwd, "all_gather")
    assert len(gathers) == 1 and sum(gathers.values()) == 1, fwd
    (shape,) = gathers
    assert shape.startswith("float32[") and shape.count(",") == 0, f"one flat fp32 summary buffer, got {shape}"
    assert set(k.split(" ")[0] for k in fwd) == {"all_gather"}, fwd
    # backward: the gather's transpose (one reduce-scatter of the summaries' cotangents) and the sum of
    # the replicated initial state's cotangent; nothing of q's size is ever gathered.
    bwd = {k: total[k] - fwd.get(k, 0) for k in total if total[k] - fwd.get(k, 0)}
    assert sum(_by_prim(bwd, "reduce_scatter").values()) == 1, bwd
    assert not _by_prim(bwd, "all_gather") and not _by_prim(bwd, "ppermute"), bwd
    q_shape = res["shapes"]["q"]
    n = res["shapes"]["n"]
    local_q = str([q_shape[0], n] + q_shape[2:])
    assert not any(local_q in k for k in total), total


def test_lasp1_is_a_serial_chain(sp_suites):
    res = _result(sp_suites, "lasp1-p4-simple_gla")
    states = {k: v for k, v in res["forward"].items() if k.startswith("ppermute float32")}
    assert list(states.values()) == [3], res["forward"]  # P - 1 hops of one state
    assert not _by_prim(res["forward"], "all_gather"), res["forward"]


def test_ulysses_four_all_to_all(sp_suites):
    res = _result(sp_suites, "ulysses-p4")
    a2a = _by_prim(res["forward"], "all_to_all")
    assert sum(a2a.values()) == 4, res["forward"]  # q, k, v in; o out
    assert not _by_prim(res["forward"], "ppermute")


def test_allgather_gathers_kv_once(sp_suites):
    res = _result(sp_suites, "allgather-p4")
    sh = res["shapes"]
    kv = f"bfloat16{[sh['b'], sh['n'], sh['hkv'], 2 * sh['d']]}"  # k‖v in one gather
    meta = f"int32{[1 + sh['b'], sh['n']]}"  # positions and segment ids in another
    assert res["forward"] == {f"all_gather {kv}": 1, f"all_gather {meta}": 1}, res["forward"]
    bwd_rs = _by_prim(res["total"], "reduce_scatter")
    assert sum(bwd_rs.values()) == 1, res["total"]  # d(k‖v)


def test_ulysses_rejects_heads_not_divisible(sp_suites):
    res = _result(sp_suites, "ulysses-p4-bad-heads")
    assert res["error"] and "must divide" in res["error"], res
