"""The run driver: walks a run's stages through the state machine, one child process per attempt.

Every state change is written to the ledger (with its transition row) before the driver acts on
it; the stage's work happens outside any callback, and the outcome fires the next trigger.
`start` and `resume` share `drive`, so a resumed run follows exactly the path a fresh one does.
Per stage, `drive` either reuses a cached output (reuse.py), trains it (stage_attempt.py) or pushes
it to the Hub (upload.py); the run's end is finish.py's.
"""

from __future__ import annotations

import secrets
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainpipe import failures, faults
from trainpipe.config import UPLOAD_STAGE, config_from_snapshot, ineffective_overrides, load_config
from trainpipe.engine import lineage, liveness, preflight
from trainpipe.engine.finish import finish, stopped_by_disk
from trainpipe.engine.identity import base_model_identity
from trainpipe.engine.machine import RUN_RESUMABLE, STAGE_DONE, RunState, advance
from trainpipe.engine.observer import Observer, RunResult
from trainpipe.engine.reuse import fingerprint_for, reuse_cached
from trainpipe.engine.stage_attempt import run_stage
from trainpipe.engine.stage_process import StageWorkers, worker_mode
from trainpipe.engine.stop import StopFlag
from trainpipe.engine.upload import upload_stage
from trainpipe.errors import (
    EXIT_ENVIRONMENT,
    EXIT_GATE_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    EXIT_USAGE,
    IllegalTransition,
    RunOwned,
)
from trainpipe.paths import check_run_id, inside
from trainpipe.store.ledger import Ledger, StaleState


def new_run_id(pipeline_id: str) -> str:
    return f"{pipeline_id}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def start(config_path: str, *, ledger: Ledger, overrides: list[str] | None = None,
          sft_dataset: str | None = None, preference_dataset: str | None = None,
          observer: Observer | None = None, run_id: str | None = None, use_cache: bool = True,
          from_stage: str | None = None, cwd: str | None = None, force: bool = False,
          on_claimed: Callable[[str], None] | None = None) -> RunResult:
    """Validate everything, then create and drive a new run. Bad input raises before any write.
    `on_claimed(run_id)` is called once this process owns the run (engine/rerun.py records its job).

    `use_cache=False` trains every stage; `from_stage` trains that stage and every later one, and
    lets earlier ones come from the cache. `force` starts even when the output filesystem looks too
    small for the run (preflight's disk estimate)."""
    worker_mode()
    config = load_config(config_path, overrides=overrides, sft_dataset=sft_dataset,
                         preference_dataset=preference_dataset, cwd=cwd)
    preflight.check_from_stage(config, from_stage, config_path)
    observer = observer or Observer()
    preflight.validate_inputs(config, observer)
    preflight_notes = preflight.check(config, ledger, check_disk=not force)
    run_id = check_run_id(run_id or new_run_id(config.pipeline_id))
    run_dir = inside(config.output_dir, run_id)
    snapshot = config.model_dump(mode="json")
    ledger.create_run(run_id=run_id, pipeline_id=config.pipeline_id, config_snapshot=snapshot,
                      config_path=str(Path(config_path).resolve()), output_dir=config.output_dir,
                      run_dir=str(run_dir), stages=list(config.run_stages()),
                      cache_policy={"use_cache": use_cache, "from_stage": from_stage},
                      lineage=lineage.build(config, snapshot))
    observer.run_created(run_id, str(run_dir))
    # After the run id: scripts read it from the first line of the output.
    for note in preflight_notes + ineffective_overrides(config, overrides or []):
        observer.note(note)
    ledger.transition_run(run_id, "start", advance("run", "start"), set_owner=True)
    if on_claimed:
        on_claimed(run_id)
    return drive(ledger, run_id, observer, fault_point="run:start")


def resume(run_id: str, *, ledger: Ledger, observer: Observer | None = None, force: bool = False,
           owner_superseded: str | None = None, on_claimed: Callable[[str], None] | None = None) -> RunResult:
    """Continue a run. Refused (EnvironmentChanged, nothing written) when the environment changed in a
    way that breaks resuming it, unless `force`; what changed is recorded in the `resume` transition.
    `owner_superseded`: why a `running` run's owner is known to be dead although it may look alive
    (engine/scheduler.py: an earlier execution of this requeued job); it is taken over at once."""
    worker_mode()
    run = ledger.get_run(check_run_id(run_id))
    if run["state"] == RunState.RUNNING and owner_superseded and liveness.mark_abandoned(ledger, run, owner_superseded):
        run = ledger.get_run(run_id)
    run = liveness.reconcile(ledger, [run], time.time())[0]
    state = run["state"]
    if state == RunState.RUNNING:
        raise RunOwned(f"run {run_id} is owned by pid {run['owner_pid']} on host {run['owner_host']}"
                       + _job_text(ledger, run_id), hint="wait for it to finish, or stop that process first")
    if state not in RUN_RESUMABLE:
        raise IllegalTransition(f"run {run_id} is {state}; only interrupted or failed runs can be resumed",
                                hint="start a new run with `trainpipe run`")
    config = config_from_snapshot(run["config_snapshot"])
    environment, env_notes = preflight.check_environment(ledger, run, config, force=force)
    pending = [s["name"] for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE]
    preflight_notes = preflight.check(config, ledger, disk_stages=pending, check_disk=not force,
                                      needs_base_model=preflight.needs_base_model(ledger, run_id, config))
    # The compare-and-set makes the claim exclusive: of two concurrent resumes, one loses here.
    try:
        ledger.transition_run(run_id, "resume", advance("run", "resume"), expect_state=state, set_owner=True,
                              detail={"from": state, "environment": environment}, error=None, error_kind=None,
                              error_traceback=None)
    except StaleState:
        fresh = ledger.get_run(run_id)
        raise RunOwned(f"run {run_id} is owned by pid {fresh['owner_pid']} on host {fresh['owner_host']}") from None
    observer = observer or Observer()
    observer.run_created(run_id, run["run_dir"])
    if on_claimed:
        on_claimed(run_id)
    for note in env_notes + preflight_notes:
        observer.note(note)
    return drive(ledger, run_id, observer)


def _job_text(ledger: Ledger, run_id: str) -> str:
    jobs = ledger.scheduler_jobs(run_id)
    if not jobs or jobs[-1]["ended_at"] is not None:
        return ""
    return f" ({jobs[-1]['scheduler']} job {jobs[-1]['job_id']}, nodes {jobs[-1]['nodes'] or jobs[-1]['host']})"


def drive(ledger: Ledger, run_id: str, observer: Observer, fault_point: str | None = None) -> RunResult:
    run = ledger.get_run(run_id)
    config = config_from_snapshot(run["config_snapshot"])
    run_dir = Path(run["run_dir"])
    errors: list[str] = []
    # One pre-imported stage worker per run, started with the first attempt and ended with the run.
    with StopFlag() as stop, StageWorkers(inside(run_dir, ".work", "worker.log")) as workers:
        try:
            if fault_point:
                faults.orchestrator_point(fault_point)
            run_dir.mkdir(parents=True, exist_ok=True)
            fingerprints: dict[str, str | None] = {}
            base_identity: list[dict[str, Any]] = []  # computed once, by the first stage that needs it
            for stage_row in ledger.stages(run_id):
                name = stage_row["name"]
                if stage_row["state"] in STAGE_DONE:
                    fingerprints[name] = stage_row["fingerprint"]
                    continue
                if stop.requested:
                    return finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer,
                                  stop_reason=stop.reason)
                if not config.enabled(name):
                    ledger.transition_stage(run_id, name, "skip", advance("stage", "skip"),
                                            detail={"reason": "disabled in config"})
                    observer.stage_finished(name, "skipped", {}, None, None)
                    continue
                if name == UPLOAD_STAGE:
                    # Never cached and never fingerprinted: pushing is an effect, not an output to reuse.
                    end = upload_stage(ledger, run_id, config, observer)
                else:
                    if not base_identity:
                        base_identity.append(base_model_identity(config.base_model))
                    fingerprints[name] = fingerprint_for(config, name, fingerprints, base_identity[0])
                    reuse = reuse_cached(ledger, run, config, stage_row, fingerprints[name], observer, stop)
                    if reuse == "cached":
                        continue
                    if reuse == "interrupted":
                        return finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer,
                                  stop_reason=stop.reason)
                    try:
                        end = run_stage(ledger, run_id, config, run_dir, name, observer, stop, workers)
                    finally:
                        if fingerprints[name]:
                            ledger.release_stage_lease(fingerprints[name], run_id)
                if end.error:
                    errors.append(f"{name}: {end.error}")
                if end.state == "interrupted":
                    return finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer,
                                  stop_reason=stop.reason)
                if end.state == "rejected":
                    return finish(ledger, run_id, "reject", EXIT_GATE_REJECTED, errors, observer, end.gate)
                if end.state == "failed" and end.error_kind == failures.ENVIRONMENT:
                    # A full disk: nothing is wrong and nothing is lost; the run waits for space, like a
                    # stopped one, and a sweep stops at it rather than failing trial after trial.
                    return finish(ledger, run_id, "interrupt", EXIT_ENVIRONMENT, errors, observer,
                                   error_kind=end.error_kind)
                if end.state == "failed":
                    code = EXIT_USAGE if end.error_kind == failures.USER else EXIT_STAGE_FAILED
                    return finish(ledger, run_id, "fail", code, errors, observer, error_kind=end.error_kind)
            return finish(ledger, run_id, "succeed", EXIT_OK, errors, observer)
        except BaseException as exc:
            # An orchestrator failure must not leave the run `running` behind a live-looking owner,
            # to be shown later as `interrupted` as if it had been killed: it is `failed`, with why.
            # If the run already left `running`, keep that state and let the original error surface.
            failure = (failures.classify(exc, written_dirs=[run_dir, config.output_dir])
                       if isinstance(exc, Exception) else None)
            kind = failure.kind if failure else None
            message = failures.describe(exc)
            if failure is not None and kind == failures.ENVIRONMENT:
                return stopped_by_disk(ledger, run_id, run_dir, failure, observer, errors)
            try:
                ledger.transition_run(run_id, "fail", advance("run", "fail"), clear_owner=True, expect_state="running",
                                      detail={"error": message, "kind": kind}, error=message, error_kind=kind,
                                      error_traceback=traceback.format_exc() if kind == failures.BUG else None)
                recorded = True
            except StaleState:
                recorded = False
            if not recorded or kind != failures.USER:
                raise
            # A bad path or permission found here (the run dir, an export) is the user's to fix: one
            # message and exit 2, like the same problem found by the preflight.
            observer.note(f"run failed: {message}")
            errors.append(message)
            return RunResult(run_id, "failed", EXIT_USAGE, str(run_dir), None, errors, error_kind=kind)
