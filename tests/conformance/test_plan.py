"""The suite covers what the matrix claims: every evidence label has a runner, every family a full record."""

from seqmix.ops import _registry
from seqmix.ops._capabilities import evidence_cell, shipped_families
from tests.conformance import plan
from tests.parallel import sp_cases


def test_every_evidence_label_has_a_runner():
    for name in shipped_families():
        for impl in _registry.FAMILIES[name].implementations.values():
            assert set(impl.evidence) <= set(plan.RUNNERS), (name, impl.name, impl.evidence)


def test_every_record_is_complete():
    for name in shipped_families():
        fam = _registry.FAMILIES[name]
        assert fam.make_inputs and fam.modules and fam.mixers and fam.sequence_parallel, name
        assert {"reference", "xla"} <= set(fam.implementations), name
        if fam.kind == "recurrent":
            assert fam.state and fam.decode and fam.sp_summary, name


def test_every_strategy_has_sp_cases():
    covered = {(c["family"], c["strategy"]) for c in sp_cases.RECURRENT}
    for name in shipped_families():
        fam = _registry.FAMILIES[name]
        if fam.kind == "recurrent":
            assert {(name, s) for s in fam.sequence_parallel} <= covered, name
    softmax = {c["strategy"] for c in sp_cases.SOFTMAX}
    assert set(_registry.get_family("attention").sequence_parallel) <= softmax
    neighborhood = {c["strategy"] for c in sp_cases.SOFTMAX if c["mask"].startswith("neighborhood")}
    assert set(_registry.get_family("neighborhood_attention").sequence_parallel) <= neighborhood


def test_evidence_cells():
    assert evidence_cell(("tpu:interpret", "tpu:aot")) == "tpu:interpret+aot"
    assert evidence_cell(("cpu",)) == "cpu"
