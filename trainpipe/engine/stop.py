"""SIGINT/SIGTERM to the orchestrator: the running stage is asked to checkpoint at its next step
boundary and stop, and the run ends `interrupted` (resumable) rather than dying mid-write."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGINT/SIGTERM to the orchestrator: ask the running stage to checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
