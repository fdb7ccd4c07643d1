"""Sequence-parallel test cases: plain data, shared by the pytest modules and the subprocess worker.

Each case is a dict with an ``id``. The worker (``tests/parallel/sp_worker.py``) runs a suite of them
on 8 forced CPU devices in one process and prints one JSON line per case.
"""

from __future__ import annotations

# Packed documents (lengths; the last absorbs the remainder) over T = 64: boundaries inside shards,
# exactly on shard boundaries (16, 32, 48 for P = 4; 8·k for P = 8), a length-1 document, and
# documents spanning several shards.
SEGS = [5, 11, 1, 19, 12]  # boundaries at 5, 16, 17, 36, 48
SEGS_LONG = [21, 30, 2]  # a first document crossing shard boundaries (initial_state must travel)

MASK_NAMES = ["full", "causal", "window", "two_sided", "chunked", "streaming", "prefix_lm", "explicit", "composed", "power"]


def _sm(id_, strategy, p, mask, *, layout=None, seg=SEGS, hq=4, hkv=2, sink=False, soft_cap=None, mesh="1d",
        b=2, t=64, dtype="float32"):
    return dict(id=id_, strategy=strategy, p=p, mask=mask, layout=layout, seg=seg, hq=hq, hkv=hkv, sink=sink,
                soft_cap=soft_cap, mesh=mesh, b=b, t=t, dtype=dtype)


SOFTMAX = (
    # every mask kind, ring over 4 devices, GQA, packed documents crossing shard boundaries
    [_sm(f"ring-p4-{m}", "ring", 4, m) for m in MASK_NAMES]
    # load-balancing layouts over 2, 4, 8 devices
    + [_sm(f"ring-p{p}-{lay}-causal", "ring", p, "causal", layout=lay) for p in (2, 4, 8) for lay in ("zigzag", "striped")]
    + [
        _sm("ring-p8-zigzag-streaming-sink", "ring", 8, "streaming", layout="zigzag", sink=True),
        _sm("ring-p4-striped-prefix_lm", "ring", 4, "prefix_lm", layout="striped"),
        _sm("ring-p4-softcap-sink-noseg", "ring", 4, "causal", seg=None, sink=True, soft_cap=5.0, hkv=1),
        _sm("ring-p2-window-mha", "ring", 2, "window", hkv=4),
        # Ulysses (heads divisible by P)
        _sm("ulysses-p2-causal-sink", "ulysses", 2, "causal", sink=True),
        _sm("ulysses-p2-zigzag-prefix_lm", "ulysses", 2, "prefix_lm", layout="zigzag"),
        _sm("ulysses-p4-explicit", "ulysses", 4, "explicit", hq=8, hkv=4),
        _sm("ulysses-p8-striped-streaming", "ulysses", 8, "streaming", layout="striped", hq=8, hkv=8),
        # all-gather KV
        _sm("allgather-p4-striped-causal-sink", "allgather", 4, "causal", layout="striped", sink=True),
        _sm("allgather-p4-zigzag-composed", "allgather", 4, "composed", layout="zigzag"),
        _sm("allgather-p8-prefix_lm", "allgather", 8, "prefix_lm"),
        _sm("allgather-p2-chunked", "allgather", 2, "chunked"),
        # asymmetric 2-D meshes: batch on one axis, sequence on the other
        _sm("ring-data2xseq4-zigzag-causal", "ring", 4, "causal", layout="zigzag", mesh="data2_seq4"),
        _sm("ring-data4xseq2-streaming", "ring", 2, "streaming", mesh="data4_seq2", b=4),
        _sm("ulysses-seq4xdata2-causal", "ulysses", 4, "causal", mesh="seq4_data2", hq=4, hkv=4),
        _sm("allgather-seq2xdata4-striped-prefix_lm", "allgather", 2, "prefix_lm", layout="striped",
            mesh="seq2_data4", b=4),
        # inside the caller's own shard_map: relative positions derived by the strategy (one int gather)
        dict(_sm("ring-p4-zigzag-prefix_lm-direct", "ring", 4, "prefix_lm", layout="zigzag", sink=True), direct=True),
        dict(_sm("ulysses-p2-streaming-direct", "ulysses", 2, "streaming"), direct=True),
        dict(_sm("allgather-p4-striped-streaming-direct", "allgather", 4, "streaming", layout="striped"), direct=True),
        # bf16 in, bf16 out (tolerances of the softmax bf16 kind against the single-device bf16 op)
        _sm("ring-p2-zigzag-causal-bf16", "ring", 2, "causal", layout="zigzag", dtype="bfloat16"),
        # neighborhood attention (its family's strategies), 1-D and 2-D along the first axis
        _sm("ring-p4-neighborhood_1d", "ring", 4, "neighborhood_1d", seg=None),
        _sm("ring-p4-zigzag-neighborhood_2d", "ring", 4, "neighborhood_2d", layout="zigzag", seg=None),
        _sm("allgather-p4-neighborhood_2d", "allgather", 4, "neighborhood_2d", seg=None),
    ]
)

def _recurrent_families():
    """Every shipped recurrent family whose record names a LASP strategy (read from the registry)."""
    from seqmix.ops._capabilities import shipped_families
    from seqmix.ops._registry import FAMILIES

    return [n for n in shipped_families() if FAMILIES[n].kind == "recurrent" and FAMILIES[n].sequence_parallel]


FAMILY_NAMES = _recurrent_families()


def _strategies(family):
    from seqmix.ops._registry import FAMILIES

    return FAMILIES[family].sequence_parallel


def _rc(id_, family, strategy, p, *, seg=SEGS, h0=True, mesh="1d", b=2, t=64):
    return dict(id=id_, family=family, strategy=strategy, p=p, seg=seg, h0=h0, mesh=mesh, b=b, t=t)


RECURRENT = (
    # every strategy each family's record names, on 4 devices
    [_rc(f"lasp2-p4-{f}", f, "lasp2", 4) for f in FAMILY_NAMES if "lasp2" in _strategies(f)]
    + [_rc(f"lasp1-p4-{f}", f, "lasp1", 4, seg=SEGS_LONG) for f in FAMILY_NAMES if "lasp1" in _strategies(f)]
    + [
        _rc("lasp2-p8-gated_delta_rule-long", "gated_delta_rule", "lasp2", 8, seg=SEGS_LONG),
        _rc("lasp2-p8-gla-noseg", "gla", "lasp2", 8, seg=None),
        _rc("lasp2-p2-simple_gla-long", "simple_gla", "lasp2", 2, seg=SEGS_LONG),
        _rc("lasp2-p2-linear_attention-noh0", "linear_attention", "lasp2", 2, h0=False),
        _rc("lasp1-p8-delta_rule", "delta_rule", "lasp1", 8),
        _rc("lasp2-data2xseq4-gated_delta_rule", "gated_delta_rule", "lasp2", 4, mesh="data2_seq4", seg=SEGS_LONG),
        _rc("lasp2-seq2xdata4-retention", "retention", "lasp2", 2, mesh="seq2_data4", b=4),
    ]
)

# MoBA by all-gather KV (its family's own strategy): blocks and documents crossing shard boundaries.
MOBA = [
    dict(id="allgather-p4-moba-packed", p=4, seg=SEGS, block_size=6, topk=3, hq=4, hkv=2),
    dict(id="allgather-p2-moba-noseg", p=2, seg=None, block_size=5, topk=2, hq=2, hkv=2),
    dict(id="allgather-p8-moba-topk1", p=8, seg=SEGS_LONG, block_size=7, topk=1, hq=4, hkv=1),
]

# Collective structure (jaxpr): strategy, P.
JAXPR = (
    [dict(id=f"ring-p{p}", kind="ring", p=p) for p in (2, 4, 8)]
    + [dict(id=f"lasp2-p{p}-{f}", kind="lasp2", family=f, p=p) for p in (2, 8)
       for f in ("gated_delta_rule", "gla")]
    + [dict(id="lasp1-p4-simple_gla", kind="lasp1", family="simple_gla", p=4),
       dict(id="ulysses-p4", kind="ulysses", p=4),
       dict(id="allgather-p4", kind="allgather", p=4),
       dict(id="ulysses-p4-bad-heads", kind="ulysses_bad_heads", p=4)]
)

# Two halves of similar cost, so the suites run side by side on two cores.
SOFTMAX_A = SOFTMAX[:len(MASK_NAMES) + 6]  # every mask, then the layouts
SOFTMAX_B = SOFTMAX[len(MASK_NAMES) + 6:]
SUITES = {"softmax_a": SOFTMAX_A, "softmax_b": SOFTMAX_B, "recurrent": RECURRENT, "jaxpr": JAXPR, "moba": MOBA}


def assert_case_ok(rec) -> None:
    """Fail the calling test with the worker's message if the case failed."""
    import pytest

    if not rec["ok"]:
        pytest.fail(f"{rec['id']} failed ({rec['secs']} s):\n{rec['msg']}", pytrace=False)
