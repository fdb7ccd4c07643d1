"""Test-wide settings: CPU, fp32 matmuls at full precision (FAMILIES.md §5.1 rule 8)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ahead-of-time TPU compilation loads libtpu in several test processes at once (xdist workers,
# subprocess workers); they only compile, so sharing libtpu's lockfile is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from tests import _xla_flags  # noqa: E402

_xla_flags.add(_xla_flags.FAST_COMPILE)  # compile effort only (see tests/_xla_flags.py)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


def skip_reason(report) -> str:
    """The reason a skipped test report gives ("" when it gives none)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    text = text.strip()
    if text.startswith("Skipped:"):
        text = text[len("Skipped:"):].strip()
    return "" if text in ("", "None", "Skipped", "<Skipped instance>") else text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every skip must say why: a skip without a reason is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not skip_reason(report):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} was skipped without a reason: give pytest.skip / skipif a reason"
    elif (report.skipped and not hasattr(report, "wasxfail") and os.environ.get("SEQMIX_REQUIRE_GPU_COMPILE")
          and "gpu-compile" in skip_reason(report)):
        # CI's GPU-compile step installs the extra: a missing piece there is a failure, not a skip.
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: SEQMIX_REQUIRE_GPU_COMPILE is set but {skip_reason(report)}"
