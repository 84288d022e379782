"""A run's end: the result files first, then the final state (so a full disk at the very end leaves
a resumable run), and the one message a full disk in the orchestrator's own writes gets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainpipe import failures
from trainpipe.engine.exports import write_exports
from trainpipe.engine.machine import RunState, advance, next_state
from trainpipe.engine.observer import Observer, RunResult
from trainpipe.errors import EXIT_ENVIRONMENT
from trainpipe.store.ledger import Ledger, StaleState
from trainpipe.validators.gate import GateOutcome


def finish(ledger: Ledger, run_id: str, trigger: str, exit_code: int, errors: list[str], observer: Observer,
            gate: GateOutcome | None = None, error_kind: str | None = None,
            stop_reason: str | None = None) -> RunResult:
    # The result files are written before the final state, as that state will read: a full disk then
    # leaves a finished run `interrupted`, and its resume writes them, where after `succeeded` nothing could.
    finished_at = time.time()
    as_if = {"state": next_state("run", RunState.RUNNING.value, trigger), "finished_at": finished_at,
             "error": "; ".join(errors) if errors else None}
    try:
        write_exports(ledger, run_id, as_if=as_if)
    except OSError as exc:
        failure = failures.classify(exc)
        if failure.kind != failures.ENVIRONMENT:
            raise
        if error_kind != failures.ENVIRONMENT:  # a stage stopped by the same full disk said it already
            errors.append(_disk_message(failure, Path(ledger.get_run(run_id)["run_dir"]), run_id,
                                        "writing the result files (pipeline_result.json, metrics.json)",
                                        needed=f"they need ~{_exports_size(ledger, run_id, as_if)}"))
        if trigger == "succeed":
            trigger, exit_code, error_kind = "interrupt", EXIT_ENVIRONMENT, failures.ENVIRONMENT
    detail: dict[str, Any] = {"errors": errors} if errors else {}
    if stop_reason and trigger == "interrupt":
        detail["reason"] = stop_reason
    state = ledger.transition_run(run_id, trigger, advance("run", trigger), clear_owner=True,
                                  detail=detail, finished_at=finished_at,
                                  error="; ".join(errors) if errors else None, error_kind=error_kind)
    run = ledger.get_run(run_id)
    return RunResult(run_id, state, exit_code, run["run_dir"], run["final_model_path"], errors, gate, error_kind,
                     stop_reason if trigger == "interrupt" else None)


def _disk_message(failure: failures.Failure, run_dir: Path, run_id: str, doing: str,
                  needed: str | None = None) -> str:
    from trainpipe.diskspace import full_disk_message

    return f"{doing}: " + full_disk_message(failure.where or run_dir, failure.reason or "no space left on device",
                                            needed=needed)


def _exports_size(ledger: Ledger, run_id: str, as_if: dict[str, Any]) -> str:
    import json

    from trainpipe.diskspace import human
    from trainpipe.engine.exports import pipeline_result

    # Written twice (the run dir and output_dir), each through a temporary file, plus small per-stage files.
    return human(2 * len(json.dumps(pipeline_result(ledger, run_id, as_if), indent=2, default=str)) + 4096)


def stopped_by_disk(ledger: Ledger, run_id: str, run_dir: Path, failure: failures.Failure, observer: Observer,
                     errors: list[str]) -> RunResult:
    """The orchestrator's own write (a spec, the run dir, the result files) hit a full disk: the run
    stops `interrupted` with that one message, resumable once there is space; never a crash report."""
    message = _disk_message(failure, run_dir, run_id, "trainpipe could not write")
    errors.append(message)
    try:
        ledger.transition_run(run_id, "interrupt", advance("run", "interrupt"), clear_owner=True, expect_state="running",
                              detail={"errors": errors}, error="; ".join(errors), error_kind=failures.ENVIRONMENT)
    except StaleState:
        pass  # already out of `running`: its state stands; the message still says what happened
    else:
        # A stage caught mid-attempt (its spec could not be written) is failed, as for a killed owner,
        # so that the resume starts it again from its newest verified checkpoint.
        ledger.close_open_attempts(run_id, "failed", message)
        for stage in ledger.stages(run_id):
            if stage["state"] in ("running", "validating"):
                ledger.transition_stage(run_id, stage["name"], "fail", advance("stage", "fail"),
                                        detail={"error": message, "error_kind": failures.ENVIRONMENT})
    state = ledger.get_run(run_id)["state"]
    return RunResult(run_id, state, EXIT_ENVIRONMENT, str(run_dir), None, errors, error_kind=failures.ENVIRONMENT)
