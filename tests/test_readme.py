"""README.md must stay true: its capability table is the registry's, and it opens with two commands.

Regenerate the table with ``python tests/test_readme.py --write``.
"""

import re
import sys
from pathlib import Path

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


if __name__ == "__main__" and "--write" in sys.argv:
    README.write_text(_TABLE.sub(lambda m: m.group(1) + _registry_table() + m.group(3), README.read_text()))
    print("README capability table regenerated")
