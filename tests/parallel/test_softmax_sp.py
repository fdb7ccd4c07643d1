"""Softmax sequence parallelism (ring, Ulysses, all-gather KV) vs the single-device op.

Each case (``sp_cases.SOFTMAX``) runs in the 8-device worker: forward (o, lse) and every gradient
(dq, dk, dv, d sink) of ``sequence_parallel_attention`` against ``seqmix.ops.attention`` with the
``"sharded"`` tolerances; rank-coded inputs (the global position is added to a channel) so a chunk in
the wrong place shows; packed documents cross shard boundaries; GQA; zigzag / striped layouts; 2, 4
and 8 devices; asymmetric 2-D meshes.
"""

import pytest

from tests.parallel.sp_cases import SOFTMAX_A, SOFTMAX_B, assert_case_ok

SP_SUITES = ("softmax_a", "softmax_b")


@pytest.mark.parametrize("case", SOFTMAX_A, ids=[c["id"] for c in SOFTMAX_A])
def test_softmax_sp_masks_and_layouts(sp_suites, case):
    assert_case_ok(sp_suites.record("softmax_a", case["id"]))


@pytest.mark.slow  # strategies x 2/4/8 devices x 2-D meshes; the default run keeps the masks-and-layouts suite
@pytest.mark.parametrize("case", SOFTMAX_B, ids=[c["id"] for c in SOFTMAX_B])
def test_softmax_sp_strategies_meshes(sp_suites, case):
    assert_case_ok(sp_suites.record("softmax_b", case["id"]))
