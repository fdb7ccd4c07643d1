"""LASP-1 / LASP-2 vs the single-device recurrent ops, for every recurrent family.

Forward (o, final_state) and every gradient (dq, dk, dv, dg, dβ, d initial_state) with the
``"sharded"`` tolerances, on 2, 4 and 8 devices and 2-D meshes; packed documents whose boundaries fall
inside shards and exactly on shard boundaries, and a first document that spans shards (so the
initial state must travel).
"""

import pytest

import seqmix.parallel  # noqa: F401  (imports and registers the recurrent families)
from seqmix.ops._registry import FAMILIES
from tests.parallel.sp_cases import RECURRENT, assert_case_ok

SP_SUITES = ("recurrent",)


@pytest.mark.parametrize("case", RECURRENT, ids=[c["id"] for c in RECURRENT])
def test_lasp_matches_single_device(sp_suites, case):
    if case["family"] not in FAMILIES:
        pytest.skip(f"family {case['family']} not registered in this build")
    assert_case_ok(sp_suites.record("recurrent", case["id"]))
