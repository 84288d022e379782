"""`trainpipe run CONFIG --run-id ID`: the same command, executed again, continues the run.

A requeued Slurm job, a restarted Kubernetes pod and a recovered SkyPilot managed job re-execute the
command they were given. Under one run id that command
- starts the run when no run has that id;
- resumes it when it is `interrupted`, or `failed` with a kind a retry can fix (the same checks as
  `trainpipe resume`: lineage, disk, an owner that may still be alive);
- reports a finished run (succeeded, rejected, or failed for good) and trains nothing, with the exit
  code that run ended with;
- refuses a different config under the same id, naming the keys that differ.
Inside a Slurm job the id defaults to one the job implies, each execution is recorded with the run
(scheduler_jobs), and a stop on the scheduler's warning requeues the job (engine/scheduler.py).
"""

from __future__ import annotations

from typing import Any

from trainpipe import failures
from trainpipe.config import load_config
from trainpipe.engine import driver, scheduler
from trainpipe.engine.observer import Observer, RunResult
from trainpipe.errors import (
    EXIT_GATE_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    EXIT_USAGE,
    ConfigError,
    RunOwned,
)
from trainpipe.paths import check_run_id
from trainpipe.store.ledger import Ledger

FINISHED_EXIT = {"succeeded": EXIT_OK, "rejected": EXIT_GATE_REJECTED, "cancelled": EXIT_STAGE_FAILED}


def run(config_path: str, *, ledger: Ledger, run_id: str | None, overrides: list[str] | None = None,
        sft_dataset: str | None = None, preference_dataset: str | None = None,
        observer: Observer | None = None, use_cache: bool = True, from_stage: str | None = None,
        force: bool = False, max_requeues: int | None = None) -> RunResult:
    observer = observer or Observer()
    job = scheduler.current_job()
    config = load_config(config_path, overrides=overrides, sft_dataset=sft_dataset,
                         preference_dataset=preference_dataset)
    run_id = run_id or scheduler.default_run_id(config.pipeline_id, job)
    if run_id is None:  # outside a scheduler, without --run-id: a new run, as always
        return driver.start(config_path, ledger=ledger, overrides=overrides, sft_dataset=sft_dataset,
                            preference_dataset=preference_dataset, observer=observer, use_cache=use_cache,
                            from_stage=from_stage, force=force)
    check_run_id(run_id)
    limit = scheduler.max_requeues(max_requeues)
    if limit < 0:
        raise ConfigError(f"--max-requeues must be 0 or more, got {limit}")
    job_row: list[int] = []

    def claimed(claimed_id: str) -> None:
        if job is not None:
            job_row.append(ledger.record_job_start(claimed_id, scheduler=job.scheduler, job_id=job.job_id,
                                                   restart_count=job.restart_count, nodes=job.nodes))
            observer.note(f"{job.describe()} drives this run")

    existing = ledger.find_run(run_id)
    if existing is None:
        try:
            result = driver.start(config_path, ledger=ledger, overrides=overrides, sft_dataset=sft_dataset,
                                  preference_dataset=preference_dataset, observer=observer, run_id=run_id,
                                  use_cache=use_cache, from_stage=from_stage, force=force, on_claimed=claimed)
        except Exception:
            if ledger.find_run(run_id) is not None and not job_row:
                # Two executions created the same id at once; the other one's insert won.
                raise RunOwned(f"run {run_id} was just started by another process") from None
            raise
    else:
        differing = snapshot_differences(existing["config_snapshot"], config.model_dump(mode="json"))
        if differing:
            shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more" if len(differing) > 8 else "")
            raise ConfigError(f"run {run_id} exists with a different config: {shown} differ",
                              hint=f"rerun it with the config it started with, or choose another --run-id "
                                   f"(`trainpipe inspect {run_id}` shows its config)")
        finished = _finished_result(ledger, existing)
        if finished is not None:
            observer.note(f"run {run_id} has already {finished.state}; nothing to train")
            return finished
        jobs = ledger.scheduler_jobs(run_id)
        superseded = scheduler.superseded_owner(existing, jobs, job) if existing["state"] == "running" else None
        if superseded and jobs and jobs[-1]["ended_at"] is None:
            ledger.record_job_end(jobs[-1]["id"], "lost")  # killed with its node or requeued by Slurm itself
        result = driver.resume(run_id, ledger=ledger, observer=observer, force=force,
                               owner_superseded=superseded, on_claimed=claimed)
    if job is not None and job_row:
        _end_job(ledger, job, job_row[0], result, limit, observer)
    return result


def _finished_result(ledger: Ledger, run: dict[str, Any]) -> RunResult | None:
    """The run as it ended, when there is nothing left to do for it: succeeded, rejected, cancelled, or
    failed with a kind that a rerun would meet again (bad input, a bug)."""
    state, kind = run["state"], run["error_kind"]
    if state in FINISHED_EXIT:
        code = FINISHED_EXIT[state]
    elif state == "failed" and kind in (failures.USER, failures.BUG):
        code = EXIT_USAGE if kind == failures.USER else EXIT_STAGE_FAILED
    else:
        return None
    errors = [run["error"]] if run["error"] else []
    return RunResult(run["run_id"], state, code, run["run_dir"], run["final_model_path"], errors, error_kind=kind)


def _end_job(ledger: Ledger, job: scheduler.Job, job_row: int, result: RunResult, limit: int,
             observer: Observer) -> None:
    """Record how this execution of the job left the run, and requeue the job after the scheduler's
    warning, while requeues are left. Recorded first: `scontrol requeue` ends this process."""
    if not (result.state == "interrupted" and result.stop_reason == "preempted"):
        ledger.record_job_end(job_row, result.stop_reason or result.state)
        return
    how_to_continue = (f"continue with `scontrol requeue {job.raw_id}`, by submitting the same job script "
                       f"again, or with `trainpipe resume {result.run_id}`")
    if job.restart_count >= limit:
        ledger.record_job_end(job_row, "preempted")
        message = (f"run {result.run_id} stays interrupted: job {job.job_id} has used its {limit} requeue(s) "
                   f"(--max-requeues); {how_to_continue}")
        observer.note(message)
        result.errors.append(message)
        return
    ledger.record_job_end(job_row, "preempted", requeued=True)
    problem = scheduler.requeue(job)
    if problem is not None:
        ledger.record_job_end(job_row, "requeue_refused")
        message = f"run {result.run_id} stays interrupted: the job could not be requeued ({problem}); {how_to_continue}"
        observer.note(message)
        result.errors.append(message)
        return
    observer.note(f"requeued {job.describe()} (requeue {job.restart_count + 1} of {limit}); the run continues "
                  "when the scheduler starts it again")
    result.exit_code = EXIT_INTERRUPTED
    result.requeued_job = job.job_id


def snapshot_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config snapshots."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            keys += snapshot_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".") or "(config)"]

