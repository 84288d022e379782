"""What a run reports as it goes (Observer: the CLI renders it) and what it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from trainpipe.validators.gate import GateOutcome


class Observer:
    """Receives progress; the CLI renders it. Every method is optional."""

    def run_created(self, run_id: str, run_dir: str) -> None: ...
    def stage_started(self, stage: str, attempt: int, resumed_from: str | None) -> None: ...
    def stage_progress(self, stage: str, step: int, total: int, logs: dict[str, Any] | None) -> None: ...
    def stage_finished(self, stage: str, state: str, metrics: dict[str, Any], gate: GateOutcome | None,
                       error: str | None) -> None: ...
    def note(self, text: str) -> None: ...
    def data_phase(self, role: str, phase: str, rows: int, seconds: float | None) -> None:
        """A dataset's load/check/tokenize phase: rows so far, and its duration once it is done."""


@dataclass
class RunResult:
    run_id: str
    state: str
    exit_code: int
    run_dir: str
    final_model_path: str | None
    errors: list[str] = field(default_factory=list)
    rejected_gate: GateOutcome | None = None
    error_kind: str | None = None  # user, transient or bug when the run failed (trainpipe/failures.py)
    # Why an interrupted run stopped: preempted (the scheduler's warning, SIGUSR2), terminated (SIGTERM),
    # interrupted (Ctrl-C); None otherwise (engine/stop.py).
    stop_reason: str | None = None
    requeued_job: str | None = None  # the scheduler job that requeued itself to continue the run


class StageEnd(NamedTuple):
    state: str
    error: str | None = None
    gate: GateOutcome | None = None
    error_kind: str | None = None
