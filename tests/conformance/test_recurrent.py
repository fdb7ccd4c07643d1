"""The recurrent families' conformance suite, generated from the registry (tests/conformance/plan.py).

For every recurrent family x implementation x numeric evidence mode (``cpu``; ``tpu:interpret`` = the
Pallas TPU interpreter on CPU; ``gpu:interpret`` = the Mosaic GPU interpreter, head dims 64): forward and VJP against the reference in fp32 with stress gates, packed
documents, an initial state and a length that does not divide the chunk; the same in bf16; packed vs
per-document; chained halves vs one call. Per family: the decode step iterated vs the parallel form.
Interpret mode simulates every kernel step on CPU, so its cells run the reference comparisons only
(packing and chaining are properties of the algorithm, checked on the XLA form).
"""

import jax.numpy as jnp
import pytest

from seqmix.ops import _registry
from tests.conformance import plan
from tests.conformance import recurrent_checks as rc

CELLS = plan.cells("recurrent")
XLA_CELLS = [c for c in CELLS if c[2] == "cpu"]
FAMILIES = sorted(n for n, f in _registry.FAMILIES.items() if f.kind == "recurrent")


def _marks(cell):
    return [pytest.mark.interpret] if cell[2].endswith(":interpret") else []


def _params(cells):
    return [pytest.param(c, id=plan.cell_id(c), marks=_marks(c)) for c in cells]


@pytest.mark.parametrize("cell", _params(CELLS))
def test_matches_reference_fp32(cell):
    family, impl, mode = cell
    with plan.mode_context(mode):
        rc.check_against_reference(_registry.get_family(family), impl, head_dim=plan.head_dim(mode))


@pytest.mark.parametrize("cell", _params(CELLS))
def test_matches_reference_bf16(cell):
    family, impl, mode = cell
    with plan.mode_context(mode):
        rc.check_against_reference(_registry.get_family(family), impl, dtype=jnp.bfloat16, regime="typical", seed=3,
                                   head_dim=plan.head_dim(mode))


@pytest.mark.parametrize("cell", _params(XLA_CELLS))
def test_packed_equals_per_document(cell):
    family, impl, mode = cell
    rc.check_packed_equals_per_document(_registry.get_family(family), impl)


@pytest.mark.parametrize("cell", _params(XLA_CELLS))
def test_chained_halves_equal_one_call(cell):
    family, impl, mode = cell
    rc.check_chained_halves(_registry.get_family(family), impl)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_matches_parallel_form(family):
    rc.check_decode_matches_parallel(_registry.get_family(family))
