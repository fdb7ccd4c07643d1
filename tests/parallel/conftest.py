"""Subprocess suites for the multi-device tests.

The number of forced CPU devices is fixed when JAX starts, so every multi-device check runs in a
worker process (``tests/parallel/sp_worker.py``, 8 devices) that executes a whole suite of cases and
prints one JSON line per case. Test modules name the suites they read in a module-level ``SP_SUITES``;
a suite starts on first use and each test looks up its case's record. Run with ``--dist loadfile``
under pytest-xdist so one worker owns each module's suites.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1200
# TPU ahead-of-time compilation needs libtpu (the ``tpu`` extra, or a directory holding the package).
LIBTPU_PATH = os.environ.get("SEQMIX_LIBTPU_PATH", "")  # optional: a directory holding an unpacked libtpu
WORKERS = {"tpu_aot": "tests.parallel.tpu_aot_worker"}  # suite -> module; default: sp_worker SUITE


class _Suites:
    def __init__(self, names):
        self.names = sorted(names)
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, dict] = {}
        self.logs: dict[str, str] = {}

    def _start(self, name):
        env = dict(os.environ)
        env["JAX_PLATFORMS"] = "cpu"
        paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if name in WORKERS:
            cmd = [sys.executable, "-m", WORKERS[name]]
            env.pop("XLA_FLAGS", None)
            if LIBTPU_PATH:
                paths.append(LIBTPU_PATH)
        else:
            cmd = [sys.executable, "-m", "tests.parallel.sp_worker", name]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)

    def get(self, name) -> dict:
        if name not in self.procs:  # only this suite: under pytest-xdist every worker has its own _Suites
            self._start(name)
        if name not in self.results:
            proc = self.procs[name]
            try:
                out, _ = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            recs = {}
            for line in out.splitlines():
                if line.startswith("SPCASE "):
                    rec = json.loads(line[len("SPCASE "):])
                    recs[rec["id"]] = rec
            self.results[name] = recs
            self.logs[name] = out[-4000:]
        return self.results[name]

    def record(self, suite, case_id) -> dict:
        recs = self.get(suite)
        if "__skip__" in recs:
            pytest.skip(recs["__skip__"]["msg"])
        if case_id not in recs:
            pytest.fail(f"suite {suite!r} produced no record for {case_id!r}; worker output tail:\n{self.logs[suite]}")
        return recs[case_id]

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


def pytest_collection_finish(session):
    """Remember the suites of the tests that will run (after -k / -m deselection)."""
    names = set()
    for item in session.items:
        module = getattr(item, "module", None)
        names.update(getattr(module, "SP_SUITES", ()) if module is not None else ())
    session.config._sp_suites = names


@pytest.fixture(scope="session")
def sp_suites(request):
    suites = _Suites(getattr(request.config, "_sp_suites", set()))
    yield suites
    suites.close()

