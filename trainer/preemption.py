"""SIGTERM/SIGINT -> "checkpoint, then stop": the training loop polls `requested` after each
step."""

from __future__ import annotations

import signal
import threading


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerunning the stage resumes it."""


class PreemptionGuard:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = signum

    def __enter__(self) -> "PreemptionGuard":
        # Signal handlers can only be installed from the main thread; elsewhere (e.g. a thread pool
        # runner) the process's own handling stays in force.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
