"""Signals to the orchestrator: the running stage is asked to checkpoint at its next step boundary
and stop, and the run ends `interrupted` (resumable) rather than dying mid-write.

SIGUSR2 is the scheduler's warning before a time limit or a preemption (`#SBATCH
--signal=B:USR2@GRACE`; USR2 because NCCL may use USR1): the run stops the same way, with the reason
`preempted`, and a Slurm job then requeues itself (engine/scheduler.py)."""

from __future__ import annotations

import signal
from typing import Any

# What each signal means for the run, recorded as the interrupt's reason.
STOP_REASONS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGUSR2: "preempted"}


class StopFlag:
    """SIGINT/SIGTERM/SIGUSR2 to the orchestrator: ask the running stage to checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        try:
            for sig in STOP_REASONS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        # The first signal names the stop: a scheduler's warning followed by its SIGTERM stays `preempted`.
        self.reason = self.reason or STOP_REASONS.get(signal.Signals(signum), "interrupted")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
