"""MoBA sequence parallelism (all-gather KV, the strategy its family record names) vs ``ops.moba``.

Each case (``sp_cases.MOBA``) runs in the 8-device worker: o, lse, dq, dk, dv with the ``"sharded"``
tolerances on rank-coded inputs; MoBA blocks and packed documents cross shard boundaries (block sizes
that do not divide the shard length), 2, 4 and 8 devices, GQA, and ``topk = 1`` (own block only).
"""

import pytest

from tests.parallel.sp_cases import MOBA, assert_case_ok

SP_SUITES = ("moba",)


@pytest.mark.parametrize("case", MOBA, ids=[c["id"] for c in MOBA])
def test_moba_allgather_matches_the_single_device_op(sp_suites, case):
    assert_case_ok(sp_suites.record("moba", case["id"]))
