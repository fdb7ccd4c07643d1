"""The run's clock and its files: the time budget, the output rewritten after every step, the progress log."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from .common import SCRIPT
from .report import markdown


class Budget:
    """Wall-clock budget from the script's start: ``left()`` to the end or to a phase deadline."""

    def __init__(self, total_s: float):
        self.t0 = time.monotonic()
        self.end = self.t0 + total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, deadline: float | None = None) -> float:
        return min(self.end, deadline if deadline is not None else self.end) - time.monotonic()


class Output:
    """What the run writes under ``--out``, rewritten after every step (a watchdog can flush it too)."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.lock = threading.Lock()
        self.env: dict = {}
        self.cases: list[dict] = []
        self.recorded: list[dict] = []
        self.incomplete: list[dict] = []
        self.rows: list[dict] = []
        self.fla_checks: dict = {}
        self.notes: list[str] = []
        self.results_doc: dict | None = None
        self.finished = False

    def _dump(self, name: str, data) -> None:
        path = self.out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)

    def write(self, note: str | None = None) -> None:
        with self.lock:
            if note:
                self.notes.append(note)
            self.out.mkdir(parents=True, exist_ok=True)
            meta = dict(script=SCRIPT, smoke=self.smoke, finished=self.finished, notes=self.notes, env=self.env)
            summary = {s: sum(1 for c in self.cases if c["status"] == s) for s in ("passed", "failed", "skipped")}
            self._dump("gpu_conformance.json", dict(meta, summary=summary, recorded=self.recorded,
                                                    incomplete=self.incomplete, cases=self.cases))
            if self.results_doc is not None:
                self._dump("device_results.json", self.results_doc)
            self._dump("gpu_bench.json", dict(meta, fla_checks=self.fla_checks, rows=self.rows))
            self._dump("gpu_bench.md", markdown(self))


def log(budget: Budget, msg: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {msg}", flush=True)
