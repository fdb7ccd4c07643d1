"""``help(seqmix.ops.<op>)`` is the op's real documentation: every parameter, returns, a runnable example,
no internal names (FAMILIES.md and the validated-call classes are for developers)."""

import inspect
import re

import pytest

from seqmix.ops import _registry
from seqmix.ops._capabilities import shipped_families

INTERNAL = ("RecurrentCall", "AttentionCall", "prepare", "FAMILIES.md", "§", "module docstring")


@pytest.mark.parametrize("family", sorted(shipped_families()))
def test_op_docstring_documents_every_parameter(family):
    op = _registry.get_family(family).op
    doc = op.__doc__ or ""
    for section in ("Args:", "Returns:", "Example::"):
        assert section in doc, f"{family}: no {section} section"
    args = doc.split("Args:")[1].split("Returns:")[0]
    documented = re.findall(r"^    (\w+): ", args, re.M)
    assert documented == list(inspect.signature(op).parameters), (family, documented)
    assert not [w for w in INTERNAL if w in doc], family


@pytest.mark.parametrize("family", sorted(shipped_families()))
def test_op_docstring_example_runs(family):
    doc = _registry.get_family(family).op.__doc__
    example = doc.split("Example::\n")[1]
    code = "\n".join(line[4:] for line in example.splitlines())
    exec(compile(code, f"{family} docstring example", "exec"), {})
