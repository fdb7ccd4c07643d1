"""Stop a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption notice).

Inside :class:`StopOnSignal` the first signal only sets a flag; the training loop checks it after each
step, saves a checkpoint at that step and raises :class:`TrainingInterrupted`, which ``seqmix train``
turns into a one-line "how to resume" message and exit status ``128 + signal``. A second signal while
the checkpoint is being written raises ``KeyboardInterrupt`` at once (an Orbax save is atomic: an
interrupted one never becomes the checkpoint ``--resume`` picks).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised by ``train`` after saving a checkpoint at ``step`` because of signal ``signum``."""

    def __init__(self, step: int, signum: int, out):
        self.step, self.signum, self.out = step, signum, out
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
                         f"{out}/checkpoints/{step}")


class StopOnSignal:
    """Context manager: SIGINT / SIGTERM set ``signum`` instead of killing the process.

    Installs its handlers only in the main thread (signals are delivered there); elsewhere it is inert."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop waiting
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
