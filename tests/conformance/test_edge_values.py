"""Edge values for every family x implementation x numeric mode (rules: tests/conformance/edge_values.py
and FAMILIES.md §5.5). One module, so the references are computed once per process for every cell.

Interpret-mode cells (Pallas TPU or Mosaic GPU kernels simulated on CPU, seconds per call) run the non-finite,
extreme-gate and masked-row-with-sinks cases (``edge_values.INTERPRET_CASES``), the last two with
gradients, which exercise the kernels' own backward passes.
"""

import pytest

from seqmix.ops import _registry
from tests.conformance import edge_values as ev
from tests.conformance import plan


@pytest.mark.parametrize("family,impl,mode,case_name", ev.params(plan.NUMERIC_MODES))
def test_edge_values(family, impl, mode, case_name):
    ev.run_cell(family, impl, mode, case_name)


def test_case_names_match_the_cases():
    for fam in _registry.FAMILIES.values():
        assert [c.name for c in ev._cases(fam.name)] == ev.case_names(fam)


@pytest.mark.parametrize("family", sorted(_registry.FAMILIES))
def test_empty_sequence_is_a_clear_error(family):
    fam = _registry.get_family(family)
    args, kwargs = ev.empty_call(fam)
    with pytest.raises(ValueError, match="length|empty|>= 1"):
        fam.op(*args, **kwargs)
