"""Every skip in the suite gives its reason (tests/conftest.py turns a reasonless skip into a failure)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

def test_no_reason():
    pytest.skip()

def test_none_reason():
    pytest.skip(None)

@pytest.mark.skipif(True, reason="the reason is given")
def test_with_reason():
    pass
'''


def test_a_skip_without_a_reason_fails(tmp_path):
    probe = REPO / "tests" / f"_probe_skip_{tmp_path.name}.py"
    probe.write_text(PROBE)
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                               str(probe.relative_to(REPO))], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert "2 failed, 1 skipped" in proc.stdout, proc.stdout[-2000:]
    assert "was skipped without a reason" in proc.stdout
