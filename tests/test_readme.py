"""README.md must stay true: its capability table is the registry's, and it opens with two commands.

Regenerate the table with ``python tests/test_readme.py --write``.
"""

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_TABLE = re.compile(r"(<!-- capability-matrix:start -->\n)(.*?)(<!-- capability-matrix:end -->)", re.S)


def _registry_table() -> str:
    from seqmix import ops
    from seqmix.ops._capabilities import shipped_families

    return ops.capability_markdown(shipped_families()).strip() + "\n"


def test_capability_table_matches_registry():
    m = _TABLE.search(README.read_text())
    assert m, "README lacks the capability-matrix markers"
    assert m.group(2) == _registry_table(), "README capability table is stale: run `python tests/test_readme.py --write`"


def test_readme_starts_with_two_commands():
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "seqmix train" in block[0] and "pytest" in block[1]
    # libtpu (the tpu extra, for ahead-of-time TPU compiles) prints errors whenever JAX starts on a machine
    # without a TPU: it lives in the test environment only, never in the user's .venv.
    venvs = [re.search(r"python3 -m venv (\S+)", line).group(1) for line in block]
    assert venvs[0] != venvs[1], venvs
    assert "tpu" not in block[0] and "[test,tpu]" in block[1]
    assert all(line.count(venv) >= 3 for line, venv in zip(block, venvs))  # created, installed into, run from


def _python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_python_snippets())))
def test_python_snippet_runs_as_written(index, capsys):
    """Each snippet on its own, in a fresh namespace: what a reader would paste."""
    exec(compile(_python_snippets()[index], f"README.md python snippet {index}", "exec"), {})


if __name__ == "__main__" and "--write" in sys.argv:
    README.write_text(_TABLE.sub(lambda m: m.group(1) + _registry_table() + m.group(3), README.read_text()))
    print("README capability table regenerated")
