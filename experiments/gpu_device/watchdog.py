"""The hard stop: after the budget plus a grace period, write what exists and exit with code 3."""

from __future__ import annotations

import os
import threading

import jax

from .budget import Budget, Output
from .conformance import record_results


def start_watchdog(output: Output, budget: Budget, grace_s: float) -> threading.Timer:
    """After the budget plus ``grace_s``, flush what exists and exit with code 3 (a hung compile or
    autotune must not cost the rest of the slot, nor the files)."""

    def fire():
        try:
            note = (f"watchdog: the time budget ran out (+{grace_s:.0f} s grace) during a step; this output "
                    "is partial")
            try:
                if output.results_doc is None and output.cases:  # the passes so far still count
                    record_results(output, jax.devices()[0].device_kind, output.smoke)
                output.write(note=note)
            except Exception:  # noqa: BLE001 - a list changed under json.dumps: once more
                output.write()
            print(f"watchdog: time budget exhausted after {budget.elapsed():.0f} s; partial results written "
                  f"to {output.out}", flush=True)
        finally:
            os._exit(3)

    timer = threading.Timer(max(1.0, budget.left() + grace_s), fire)
    timer.daemon = True
    timer.start()
    return timer
