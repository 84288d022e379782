"""The run driver: walks a run's stages through the state machine, one child process per attempt.

Every state change is written to the ledger (with its transition row) before the driver acts on
it; the stage's work happens outside any callback, and the outcome fires the next trigger.
`start` and `resume` share `_drive`, so a resumed run follows exactly the path a fresh one does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from trainpipe import checkpoints, failures
from trainpipe.config import (
    STAGE_ORDER,
    UPLOAD_STAGE,
    PipelineConfig,
    config_from_snapshot,
    ineffective_overrides,
    load_config,
)
from trainpipe.engine import cache, hub, lineage, liveness, preflight
from trainpipe.engine.fingerprint import base_model_identity, stage_fingerprint, upstream_stage
from trainpipe.engine.exports import write_exports
from trainpipe.engine.machine import RUN_RESUMABLE, STAGE_DONE, RunState, next_state
from trainpipe.engine.supervisor import ChildOutcome, StageWorkers, run_child, worker_mode
from trainpipe.errors import (
    EXIT_GATE_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ENVIRONMENT,
    EXIT_STAGE_FAILED,
    EXIT_USAGE,
    ConfigError,
    EnvironmentChanged,
    IllegalTransition,
    RunOwned,
)
from trainpipe.faults import fire_once
from trainpipe.paths import check_run_id, inside
from trainpipe.stages import OUTPUT_DIRS
from trainpipe.stages.base import StageSpec
from trainpipe.stages.data import dataset_roles, validate
from trainpipe.store.ledger import Ledger, StaleState
from trainpipe.validators.gate import GateOutcome

RETRY_BACKOFF_S = float(os.environ.get("TRAINPIPE_RETRY_BACKOFF_S", "5"))
# How often a run waiting for another run's training of the same stage looks again.
LEASE_POLL_S = float(os.environ.get("TRAINPIPE_LEASE_POLL_S", "1"))


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


class StageEnd(NamedTuple):
    state: str
    error: str | None = None
    gate: GateOutcome | None = None
    error_kind: str | None = None


def new_run_id(pipeline_id: str) -> str:
    return f"{pipeline_id}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def start(config_path: str, *, ledger: Ledger, overrides: list[str] | None = None,
          sft_dataset: str | None = None, preference_dataset: str | None = None,
          observer: Observer | None = None, run_id: str | None = None, use_cache: bool = True,
          from_stage: str | None = None, cwd: str | None = None, force: bool = False) -> RunResult:
    """Validate everything, then create and drive a new run. Bad input raises before any write.

    `use_cache=False` trains every stage; `from_stage` trains that stage and every later one, and
    lets earlier ones come from the cache. `force` starts even when the output filesystem looks too
    small for the run (preflight's disk estimate)."""
    worker_mode()
    config = load_config(config_path, overrides=overrides, sft_dataset=sft_dataset,
                         preference_dataset=preference_dataset, cwd=cwd)
    check_from_stage(config, from_stage, config_path)
    observer = observer or Observer()
    validate_inputs(config, observer)
    preflight.check(config, ledger, check_disk=not force)
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
    for note in ineffective_overrides(config, overrides or []):
        observer.note(note)
    ledger.transition_run(run_id, "start", _fsm("run", "start"), set_owner=True)
    return _drive(ledger, run_id, observer, fault_point="run:start")


def resume(run_id: str, *, ledger: Ledger, observer: Observer | None = None, force: bool = False) -> RunResult:
    """Continue a run. Refused (EnvironmentChanged, nothing written) when the environment changed in a
    way that breaks resuming it, unless `force`; what changed is recorded in the `resume` transition."""
    worker_mode()
    run = ledger.get_run(check_run_id(run_id))
    run = liveness.reconcile(ledger, [run], time.time())[0]
    state = run["state"]
    if state == RunState.RUNNING:
        raise RunOwned(f"run {run_id} is owned by pid {run['owner_pid']} on host {run['owner_host']}",
                       hint="wait for it to finish, or stop that process first")
    if state not in RUN_RESUMABLE:
        raise IllegalTransition(f"run {run_id} is {state}; only interrupted or failed runs can be resumed",
                                hint="start a new run with `trainpipe run`")
    config = config_from_snapshot(run["config_snapshot"])
    environment, env_notes = check_environment(ledger, run, config, force=force)
    pending = [s["name"] for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE]
    preflight.check(config, ledger, needs_base_model=_needs_base_model(ledger, run_id, config),
                    disk_stages=pending, check_disk=not force)
    # The compare-and-set makes the claim exclusive: of two concurrent resumes, one loses here.
    try:
        ledger.transition_run(run_id, "resume", _fsm("run", "resume"), expect_state=state, set_owner=True,
                              detail={"from": state, "environment": environment}, error=None, error_kind=None,
                              error_traceback=None)
    except StaleState:
        fresh = ledger.get_run(run_id)
        raise RunOwned(f"run {run_id} is owned by pid {fresh['owner_pid']} on host {fresh['owner_host']}") from None
    observer = observer or Observer()
    observer.run_created(run_id, run["run_dir"])
    for note in env_notes:
        observer.note(note)
    return _drive(ledger, run_id, observer)


def check_environment(ledger: Ledger, run: dict[str, Any], config: PipelineConfig, *,
                      force: bool) -> tuple[dict[str, Any], list[str]]:
    """Compare the environment a resume would run in with the one the run last ran in (its lineage,
    as updated by earlier resumes). Returns what the `resume` transition records and the notes to
    show; raises EnvironmentChanged, before any write, on a breaking difference without `force`."""
    run_id = run["run_id"]
    now = lineage.environment(config)
    if not run.get("lineage"):
        return ({"checked": False, "now": now},
                ["environment not checked: this run was created before trainpipe recorded lineage"])
    resumes = [t["detail"] for t in ledger.transitions(run_id) if t["stage"] is None and t["trigger"] == "resume"]
    pending = [s["name"] for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE]
    diffs = lineage.compare(lineage.baseline(run["lineage"], resumes), now, pending)
    breaking = [d for d in diffs if d.breaking]
    minor = [d for d in diffs if not d.breaking]
    if breaking and not force:
        lines = [f"run {run_id} cannot be resumed as is: the environment changed in a way that breaks resuming it:",
                 *[f"  {d.line()}" for d in breaking]]
        if minor:
            lines += ["also changed (would not stop a resume):", *[f"  {d.line()}" for d in minor]]
        raise EnvironmentChanged("\n".join(lines),
                                 hint=f"nothing was recorded; restore the environment above, or resume anyway with "
                                      f"`trainpipe resume {run_id} --force` (the differences are recorded)")
    notes = []
    if breaking:
        notes.append("resumed with --force despite: " + "; ".join(d.line() for d in breaking))
    if minor:
        notes.append("environment changed since the run last ran (not breaking): "
                     + "; ".join(d.line() for d in minor))
    return {"checked": True, "forced": bool(breaking), "differences": [d.as_dict() for d in diffs], "now": now}, notes


def check_from_stage(config: PipelineConfig, from_stage: str | None, source: str) -> None:
    if from_stage is None:
        return
    if from_stage not in STAGE_ORDER:
        raise ConfigError(f"--from-stage {from_stage}: no such stage; use one of {', '.join(STAGE_ORDER)}")
    if not config.enabled(from_stage):
        raise ConfigError(f"--from-stage {from_stage}: stage '{from_stage}' is disabled in {source}")


def validate_inputs(config: PipelineConfig, observer: Observer | None = None) -> dict[str, dict[str, Any]]:
    """Every dataset row is checked before any model loads (and before the ledger is touched).
    Returns, per dataset role, its row count, format and how long the check took."""
    observer = observer or Observer()
    checked = {}
    for role in dataset_roles(config):
        source = getattr(config.datasets, role)
        observer.data_phase(role, "check", 0, None)
        checked[role] = validate(source, role, progress=lambda rows, role=role: observer.data_phase(
            role, "check", rows, None))
        observer.data_phase(role, "check", checked[role]["rows"], checked[role]["seconds"])
    return checked


def _needs_base_model(ledger: Ledger, run_id: str, config: PipelineConfig) -> bool:
    """Whether a stage still to run loads the base model (a resume after SFT and merge passed does not)."""
    return any(config.enabled(s["name"]) and s["name"] != UPLOAD_STAGE
               and config.base_model in _stage_inputs(ledger, run_id, config, s["name"]).values()
               for s in ledger.stages(run_id) if s["state"] not in STAGE_DONE)


def _fault_point(point: str, step: int | None = None) -> None:
    """Test hook (TRAINPIPE_FAULT {"action": "kill_orchestrator", "at": "sft:validate", ...}): SIGKILL
    this process right after the named ledger write, to prove a resume recovers from that moment.
    Points: run:start, <stage>:start|validate|pass_gate, <stage>:checkpoint (with "step"), and
    <stage>:checkpoint_written (with "step": the stage wrote it, the ledger has not recorded it yet).
    "crash_orchestrator" raises there instead: an orchestrator bug, for the CLI's last-resort handler."""
    raw = os.environ.get("TRAINPIPE_FAULT")
    if not raw or '_orchestrator"' not in raw:
        return
    import json

    fault = json.loads(raw)
    if fault.get("at") != point or (step is not None and fault.get("step") != step):
        return
    if fire_once(fault):
        if fault.get("action") == "crash_orchestrator":
            raise RuntimeError(f"injected orchestrator crash at {point} (TRAINPIPE_FAULT)")
        os.kill(os.getpid(), signal.SIGKILL)


def _fsm(kind: str, trigger: str):
    return lambda current: next_state(kind, current, trigger)


class _StopFlag:
    """SIGINT/SIGTERM to the orchestrator: ask the running stage to checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


def _drive(ledger: Ledger, run_id: str, observer: Observer, fault_point: str | None = None) -> RunResult:
    run = ledger.get_run(run_id)
    config = config_from_snapshot(run["config_snapshot"])
    run_dir = Path(run["run_dir"])
    errors: list[str] = []
    # One pre-imported stage worker per run, started with the first attempt and ended with the run.
    with _StopFlag() as stop, StageWorkers(inside(run_dir, ".work", "worker.log")) as workers:
        try:
            if fault_point:
                _fault_point(fault_point)
            run_dir.mkdir(parents=True, exist_ok=True)
            fingerprints: dict[str, str | None] = {}
            base_identity: list[dict[str, Any]] = []  # computed once, by the first stage that needs it
            for stage_row in ledger.stages(run_id):
                name = stage_row["name"]
                if stage_row["state"] in STAGE_DONE:
                    fingerprints[name] = stage_row["fingerprint"]
                    continue
                if stop.requested:
                    return _finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer)
                if not config.enabled(name):
                    ledger.transition_stage(run_id, name, "skip", _fsm("stage", "skip"),
                                            detail={"reason": "disabled in config"})
                    observer.stage_finished(name, "skipped", {}, None, None)
                    continue
                if name == UPLOAD_STAGE:
                    # Never cached and never fingerprinted: pushing is an effect, not an output to reuse.
                    end = _upload_stage(ledger, run_id, config, observer)
                else:
                    if not base_identity:
                        base_identity.append(base_model_identity(config.base_model))
                    fingerprints[name] = _fingerprint(config, name, fingerprints, base_identity[0])
                    reuse = _reuse_cached(ledger, run, config, stage_row, fingerprints[name], observer, stop)
                    if reuse == "cached":
                        continue
                    if reuse == "interrupted":
                        return _finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer)
                    try:
                        end = _run_stage(ledger, run_id, config, run_dir, name, observer, stop, workers)
                    finally:
                        if fingerprints[name]:
                            ledger.release_stage_lease(fingerprints[name], run_id)
                if end.error:
                    errors.append(f"{name}: {end.error}")
                if end.state == "interrupted":
                    return _finish(ledger, run_id, "interrupt", EXIT_INTERRUPTED, errors, observer)
                if end.state == "rejected":
                    return _finish(ledger, run_id, "reject", EXIT_GATE_REJECTED, errors, observer, end.gate)
                if end.state == "failed" and end.error_kind == failures.ENVIRONMENT:
                    # A full disk: nothing is wrong and nothing is lost; the run waits for space, like a
                    # stopped one, and a sweep stops at it rather than failing trial after trial.
                    return _finish(ledger, run_id, "interrupt", EXIT_ENVIRONMENT, errors, observer,
                                   error_kind=end.error_kind)
                if end.state == "failed":
                    code = EXIT_USAGE if end.error_kind == failures.USER else EXIT_STAGE_FAILED
                    return _finish(ledger, run_id, "fail", code, errors, observer, error_kind=end.error_kind)
            return _finish(ledger, run_id, "succeed", EXIT_OK, errors, observer)
        except BaseException as exc:
            # An orchestrator failure must not leave the run `running` behind a live-looking owner,
            # to be shown later as `interrupted` as if it had been killed: it is `failed`, with why.
            # If the run already left `running`, keep that state and let the original error surface.
            failure = (failures.classify(exc, written_dirs=[run_dir, config.output_dir])
                       if isinstance(exc, Exception) else None)
            kind = failure.kind if failure else None
            message = failures.describe(exc)
            if failure is not None and kind == failures.ENVIRONMENT:
                return _stopped_by_disk(ledger, run_id, run_dir, failure, observer, errors)
            try:
                ledger.transition_run(run_id, "fail", _fsm("run", "fail"), clear_owner=True, expect_state="running",
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


def _finish(ledger: Ledger, run_id: str, trigger: str, exit_code: int, errors: list[str], observer: Observer,
            gate: GateOutcome | None = None, error_kind: str | None = None) -> RunResult:
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
    state = ledger.transition_run(run_id, trigger, _fsm("run", trigger), clear_owner=True,
                                  detail={"errors": errors} if errors else {}, finished_at=finished_at,
                                  error="; ".join(errors) if errors else None, error_kind=error_kind)
    run = ledger.get_run(run_id)
    return RunResult(run_id, state, exit_code, run["run_dir"], run["final_model_path"], errors, gate, error_kind)


def _disk_message(failure: failures.Failure, run_dir: Path, run_id: str, doing: str,
                  needed: str | None = None) -> str:
    from trainpipe.engine.disk import full_disk_message

    return f"{doing}: " + full_disk_message(failure.where or run_dir, failure.reason or "no space left on device",
                                            needed=needed)


def _exports_size(ledger: Ledger, run_id: str, as_if: dict[str, Any]) -> str:
    import json

    from trainpipe.engine.disk import human
    from trainpipe.engine.exports import pipeline_result

    # Written twice (the run dir and output_dir), each through a temporary file, plus small per-stage files.
    return human(2 * len(json.dumps(pipeline_result(ledger, run_id, as_if), indent=2, default=str)) + 4096)


def _stopped_by_disk(ledger: Ledger, run_id: str, run_dir: Path, failure: failures.Failure, observer: Observer,
                     errors: list[str]) -> RunResult:
    """The orchestrator's own write (a spec, the run dir, the result files) hit a full disk: the run
    stops `interrupted` with that one message, resumable once there is space; never a crash report."""
    message = _disk_message(failure, run_dir, run_id, "trainpipe could not write")
    errors.append(message)
    try:
        ledger.transition_run(run_id, "interrupt", _fsm("run", "interrupt"), clear_owner=True, expect_state="running",
                              detail={"errors": errors}, error="; ".join(errors), error_kind=failures.ENVIRONMENT)
    except StaleState:
        pass  # already out of `running`: its state stands; the message still says what happened
    else:
        # A stage caught mid-attempt (its spec could not be written) is failed, as for a killed owner,
        # so that the resume starts it again from its newest verified checkpoint.
        ledger.close_open_attempts(run_id, "failed", message)
        for stage in ledger.stages(run_id):
            if stage["state"] in ("running", "validating"):
                ledger.transition_stage(run_id, stage["name"], "fail", _fsm("stage", "fail"),
                                        detail={"error": message, "error_kind": failures.ENVIRONMENT})
    state = ledger.get_run(run_id)["state"]
    return RunResult(run_id, state, EXIT_ENVIRONMENT, str(run_dir), None, errors, error_kind=failures.ENVIRONMENT)


def _upload_stage(ledger: Ledger, run_id: str, config: PipelineConfig, observer: Observer) -> StageEnd:
    """Push the run's final model to `hub_repo_id` through the stage machine (start, validate, pass_gate
    or fail); one attempt per drive, so a failure ends the run at once and a resume retries only this."""
    folder = ledger.get_run(run_id)["final_model_path"]
    repo_id = config.hub_repo_id or ""
    ledger.transition_stage(run_id, UPLOAD_STAGE, "start", _fsm("stage", "start"),
                            detail={"repo_id": repo_id, "folder": folder})
    attempt_id, attempt_no = ledger.open_attempt(run_id, UPLOAD_STAGE)
    observer.stage_started(UPLOAD_STAGE, attempt_no, None)
    try:
        commit = hub.push(folder, repo_id, run_id)
    except hub.UploadFailed as exc:
        error = (f"upload to hub failed: {exc.message}; the trained model is untouched at {folder}; "
                 f"`trainpipe resume {run_id}` retries the upload only")
        ledger.close_attempt(attempt_id, "failed", error=error, error_kind=exc.kind)
        ledger.transition_stage(run_id, UPLOAD_STAGE, "fail", _fsm("stage", "fail"),
                                detail={"kind": "failed", "error_kind": exc.kind, "error": error})
        observer.stage_finished(UPLOAD_STAGE, "failed", {}, None, error)
        return StageEnd("failed", error, None, exc.kind)
    ledger.transition_stage(run_id, UPLOAD_STAGE, "validate", _fsm("stage", "validate"), detail=commit)
    ledger.close_attempt(attempt_id, "passed", metrics=commit)
    ledger.transition_stage(run_id, UPLOAD_STAGE, "pass_gate", _fsm("stage", "pass_gate"), detail=commit)
    observer.stage_finished(UPLOAD_STAGE, "passed", commit, None, None)
    observer.note(f"uploaded {folder} to {repo_id}: {commit['commit_url']}")
    return StageEnd("passed")


def _stage_inputs(ledger: Ledger, run_id: str, config: PipelineConfig, name: str) -> dict[str, str | None]:
    outputs = {s["name"]: s["output_path"] for s in ledger.stages(run_id) if s["state"] in ("passed", "cached")}
    if name == "sft":
        return {"base_model": config.base_model}
    if name == "merge":
        return {"base_model": config.base_model, "sft_adapter": outputs.get("sft")}
    if outputs.get("merge"):
        return {"policy_model": outputs["merge"]}
    if outputs.get("sft"):
        # merge disabled: DPO continues the SFT adapter on the base, against the frozen SFT policy
        return {"policy_model": config.base_model, "policy_adapter": outputs["sft"]}
    return {"policy_model": config.base_model}


def _fingerprint(config: PipelineConfig, name: str, fingerprints: dict[str, str | None],
                 base_identity: dict[str, Any]) -> str | None:
    up = upstream_stage(config, name)
    if up is not None and fingerprints.get(up) is None:
        return None  # its input came from a stage run before this ledger had fingerprints: unknown
    return stage_fingerprint(config, name, fingerprints.get(up) if up else None, base_model=base_identity)


def _reuse_cached(ledger: Ledger, run: dict[str, Any], config: PipelineConfig, stage_row: dict[str, Any],
                  fingerprint: str | None, observer: Observer, stop: _StopFlag) -> str:
    """Record the stage's fingerprint; make the stage `cached` from an earlier run's verified output if
    the run's cache policy allows. Returns "cached" (nothing to train), "train", or "interrupted"
    (stopped while waiting for another run that is training the same stage).

    A run that trains a stage holds the lease on its fingerprint (released by `_drive` when the stage
    ends), so a run that needs the same stage meanwhile waits and then reuses it, rather than
    training it a second time at the same moment (concurrent runs, parallel sweep trials)."""
    run_id, name = run["run_id"], stage_row["name"]
    if stage_row["state"] != "pending":
        # Started in this run already (a resume): it continues from its own checkpoints, and keeps the
        # note on why it was trained. It takes back its lease unless another live run holds it (then
        # both train: the FSM has no way to turn a started stage into a cached one).
        ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=stage_row["cache_note"])
        if fingerprint:
            _lease(ledger, run_id, name, fingerprint)
        return "train"
    policy = run.get("cache_policy") or {"use_cache": True, "from_stage": None}
    from_stage = policy.get("from_stage")
    note: str | None = None
    if fingerprint is None:
        note = f"not looked up: the {upstream_stage(config, name)} output it reads has no fingerprint"
    elif not policy.get("use_cache", True):
        note = "not looked up: cache disabled for this run (--no-cache)"
    elif from_stage and STAGE_ORDER.index(name) >= STAGE_ORDER.index(from_stage):
        note = f"not looked up: rerun requested from stage {from_stage} (--from-stage)"
    if note is not None:
        ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=note)
        if fingerprint:
            _lease(ledger, run_id, name, fingerprint)  # others may wait for this output; we never wait
        return "train"
    assert fingerprint is not None
    waited_for: str | None = None
    while True:
        hit, problems = cache.find(ledger, run_id, name, fingerprint)
        if hit is not None:
            break
        holder = _lease(ledger, run_id, name, fingerprint)
        if holder is None:
            break  # ours to train
        if waited_for != holder["run_id"]:
            waited_for = holder["run_id"]
            observer.note(f"{name}: run {waited_for} is training the same {name} (same fingerprint); "
                          "waiting to reuse its output")
        if stop.requested:
            return "interrupted"
        ledger.heartbeat(run_id)
        time.sleep(LEASE_POLL_S)
    note = "not reused: " + "; ".join(problems) if hit is None and problems else None
    ledger.set_stage_cache_info(run_id, name, fingerprint=fingerprint, cache_note=note)
    if hit is None:
        if note:
            observer.note(f"{name}: an earlier output was {note}; training it again")
        return "train"
    source = hit.candidate
    run_dir = run["run_dir"]
    output_dir = inside(run_dir, OUTPUT_DIRS[name])
    how = cache.link_into(Path(source["output_path"]), hit.files, output_dir)
    metrics, origin = cache.origin_metrics(ledger, source["run_id"], name, run_dir)
    ledger.reuse_stage(run_id, name, _fsm("stage", "reuse_cached"), source_run=source["run_id"],
                       output_path=str(output_dir),
                       files=[(str(output_dir / rel), size, digest) for rel, size, digest in hit.files],
                       final_model_path=metrics.get("final_model_path"),
                       detail={"fingerprint": fingerprint, "source_run": source["run_id"], "trained_in": origin,
                               "source_path": source["output_path"], "files": len(hit.files), "linked_by": how,
                               "waited_for": waited_for})
    _fault_point(f"{name}:cached")
    observer.stage_finished(name, "cached", metrics, None, None)
    trained = "" if origin == source["run_id"] else f", trained in {origin}"
    observer.note(f"{name}: reused from run {source['run_id']}{trained} (same fingerprint, files verified; "
                  "gate result carried over)")
    return "cached"


def _lease(ledger: Ledger, run_id: str, name: str, fingerprint: str) -> dict[str, Any] | None:
    """Take the stage lease (None), or the row of the live run that holds it. A lease whose run is no
    longer running, or whose owner is gone, is taken over."""
    holder = ledger.acquire_stage_lease(fingerprint, name, run_id)
    if holder is None:
        return None
    other = ledger.find_run(holder["run_id"])
    if other is None or other["state"] != "running" or liveness.owner_gone(other, time.time()):
        return ledger.acquire_stage_lease(fingerprint, name, run_id, replace_run=holder["run_id"])
    return holder


def newest_verified_checkpoint(ledger: Ledger, run_id: str, stage: str,
                               world_size: int | None = None) -> tuple[str | None, list[str]]:
    """The newest checkpoint whose manifest verifies (for `world_size` ranks, when given), and why
    any newer ones were passed over."""
    skipped: list[str] = []
    for row in sorted(ledger.checkpoints(run_id, stage), key=lambda r: (r["step"], r["id"]), reverse=True):
        problem = checkpoints.verify(row["path"], world_size)
        if problem is None:
            return row["path"], skipped
        skipped.append(f"{row['path']}: {problem}")
    return None, skipped


def adopt_unrecorded_checkpoints(ledger: Ledger, run_id: str, stage: str, checkpoint_root: Path) -> list[str]:
    """Record finished checkpoints the ledger never heard of.

    The stage writes the manifest, then tells the orchestrator; an orchestrator killed in between
    would otherwise throw away a complete checkpoint. The manifest's hashes make it safe to adopt.
    """
    known = {row["path"] for row in ledger.checkpoints(run_id, stage)}
    attempts = ledger.attempts(run_id, stage)
    if not attempts or not checkpoint_root.is_dir():
        return []
    adopted = []
    for path in sorted(checkpoint_root.glob("checkpoint-*"), key=lambda p: _checkpoint_step(p) or -1):
        step = _checkpoint_step(path)
        complete = step is not None and checkpoints.verify(path) is None and checkpoints.manifest_step(path) == step
        if str(path) in known or not complete:
            continue
        ledger.record_checkpoint(run_id, stage, attempts[-1]["id"], step, str(path),
                                 checkpoints.sha256_file(path / checkpoints.MANIFEST))
        adopted.append(str(path))
    return adopted


def _checkpoint_step(path: str | Path) -> int | None:
    suffix = Path(path).name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def _discard_newer_checkpoints(checkpoint_root: Path, keep: str | None) -> None:
    """Unrecorded or unverified checkpoints past the resume point would be overwritten anyway."""
    keep_step = _checkpoint_step(keep) if keep else -1
    for path in checkpoint_root.glob("checkpoint-*"):
        step = _checkpoint_step(path)
        if step is not None and step > keep_step:
            shutil.rmtree(path, ignore_errors=True)


def _oom_overrides(config: PipelineConfig, name: str, previous: dict[str, Any]) -> dict[str, Any]:
    """Halve the micro-batch and double accumulation, so the effective batch stays the same."""
    settings = getattr(config, name)
    batch = previous.get("batch_size", settings.batch_size)
    accumulation = previous.get("gradient_accumulation", settings.gradient_accumulation)
    if batch <= 1:
        return previous
    return {**previous, "batch_size": batch // 2, "gradient_accumulation": accumulation * 2}


def _run_stage(ledger: Ledger, run_id: str, config: PipelineConfig, run_dir: Path, name: str,
               observer: Observer, stop: _StopFlag, workers: StageWorkers) -> StageEnd:
    entry = config.stage(name)
    work_dir = inside(run_dir, ".work", name)
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir = inside(run_dir, OUTPUT_DIRS[name])
    overrides: dict[str, Any] = {}
    for attempt_index in range(entry.retry_count + 1):
        adopted = adopt_unrecorded_checkpoints(ledger, run_id, name, work_dir / "checkpoints")
        resume_from, skipped = newest_verified_checkpoint(
            ledger, run_id, name, lineage.world_size(getattr(config, name).model_dump(mode="json")))
        _discard_newer_checkpoints(work_dir / "checkpoints", resume_from)
        detail: dict[str, Any] = {"resume_from": resume_from}
        if skipped:
            detail["skipped_checkpoints"] = skipped
        if adopted:
            detail["adopted_checkpoints"] = adopted
        if overrides:
            detail["overrides"] = overrides
        ledger.transition_stage(run_id, name, "start", _fsm("stage", "start"), detail=detail)
        attempt_id, attempt_no = ledger.open_attempt(run_id, name, resumed_from=resume_from, overrides=overrides)
        observer.stage_started(name, attempt_no, resume_from)
        _fault_point(f"{name}:start")
        spec = StageSpec(stage=name, run_id=run_id, attempt=attempt_no, config=config.model_dump(mode="json"),
                         run_dir=str(run_dir), output_dir=str(output_dir), work_dir=str(work_dir),
                         events_path=str(work_dir / f"events-{attempt_no}.jsonl"),
                         result_path=str(work_dir / f"result-{attempt_no}.json"),
                         inputs=_stage_inputs(ledger, run_id, config, name), resume_from=resume_from,
                         overrides=overrides)
        spec_path = work_dir / f"spec-{attempt_no}.json"
        spec.save(spec_path)

        data_record: dict[str, dict[str, Any]] = {}

        def on_event(event: dict[str, Any], _attempt_id: int = attempt_id) -> None:
            if event["type"] == "data":
                if _note_data_event(data_record, event, name, observer):
                    ledger.record_attempt_data(_attempt_id, data_record)
            elif event["type"] == "note":
                observer.note(f"{name}: {event.get('text')}")
            elif event["type"] == "validating":
                event["metrics"] = {**event.get("metrics", {}), "data": data_record}
                _record_output(ledger, run_id, name, _attempt_id, event)
                observer.note(f"{name}: output written, running its gate")
            elif event["type"] == "checkpoint":
                # Killed here, the checkpoint is complete on disk but not in the ledger: resume adopts it.
                _fault_point(f"{name}:checkpoint_written", int(event["step"]))
                ledger.record_checkpoint(run_id, name, _attempt_id, int(event["step"]), event["path"],
                                         event.get("manifest_sha256"))
                _fault_point(f"{name}:checkpoint", int(event["step"]))
            elif event["type"] in ("progress", "log"):
                observer.stage_progress(name, int(event.get("step", 0)), int(event.get("total", 0)),
                                        event.get("logs"))

        fallback_before = workers.fallback_reason
        outcome = run_child(spec_path, events_path=Path(spec.events_path), result_path=Path(spec.result_path),
                            log_path=work_dir / "stage.log",
                            timeout_s=entry.timeout_minutes * 60 if entry.timeout_minutes else None,
                            on_event=on_event, on_tick=lambda: ledger.heartbeat(run_id),
                            on_start=lambda pid, worker, _a=attempt_id: ledger.set_attempt_process(_a, pid, worker),
                            stop_requested=lambda: stop.requested, workers=workers,
                            launcher=_launcher(config, name))
        if workers.fallback_reason != fallback_before:
            observer.note(f"{name}: stage processes start as fresh interpreters: {workers.fallback_reason}")
        if outcome.ok:
            outcome.result.setdefault("metrics", {})["data"] = data_record
            return _validate(ledger, run_id, config, name, attempt_id, outcome, observer, work_dir)

        if outcome.error_kind == failures.ENVIRONMENT:
            outcome.error = f"{outcome.error}; {_stage_need_text(config, name)}"
        attempt_outcome = {"timed_out": "timed_out", "interrupted": "interrupted"}.get(outcome.kind, "failed")
        ledger.close_attempt(attempt_id, attempt_outcome, exit_code=outcome.exit_code, error=outcome.error,
                             error_kind=outcome.error_kind, metrics={"data": data_record} if data_record else None,
                             error_traceback=outcome.traceback if outcome.error_kind == failures.BUG else None)
        ledger.transition_stage(run_id, name, "fail", _fsm("stage", "fail"),
                                detail={"kind": outcome.kind, "error_kind": outcome.error_kind,
                                        "error": outcome.error, "exit_code": outcome.exit_code})
        observer.stage_finished(name, "failed", {}, None, outcome.error)
        if outcome.kind == "interrupted" or stop.requested:
            return StageEnd("interrupted", outcome.error)
        if not failures.retryable(outcome.error_kind):
            if entry.retry_count > attempt_index:
                what = {failures.USER: "an input error fails the same way on every attempt",
                        failures.ENVIRONMENT: "the disk stays full until space is freed"}.get(
                    outcome.error_kind, "a bug fails the same way on every attempt")
                observer.note(f"{name}: not retried: {what}")
            return StageEnd("failed", outcome.error, None, outcome.error_kind)
        if attempt_index == entry.retry_count:
            return StageEnd("failed", outcome.error, None, outcome.error_kind)
        if outcome.kind == "oom":
            overrides = _oom_overrides(config, name, overrides)
        delay = RETRY_BACKOFF_S * (2 ** attempt_index)
        observer.note(f"{name}: attempt {attempt_no} {outcome.kind} ({outcome.error}); retrying in {delay:g} s")
        time.sleep(delay)
    return StageEnd("failed", "no attempts left", None, failures.TRANSIENT)


def _note_data_event(record: dict[str, dict[str, Any]], event: dict[str, Any], stage: str,
                     observer: Observer) -> bool:
    """A stage's data phase (load, tokenize): shown as it happens, and kept for the attempt's
    metrics, so the ledger says whether each attempt prepared or reused its data, and how long it took.
    Returns whether the record changed."""
    role, phase, action = event.get("role", "?"), event.get("phase"), event.get("action")
    seconds = event.get("seconds")
    observer.data_phase(f"{stage}/{role}", f"{phase} {action}" if action in ("reused", "prepared") else phase,
                        int(event.get("rows") or 0), seconds if action != "started" else None)
    if action == "started":
        return False
    entry = record.setdefault(role, {})
    if phase == "load":
        entry["load_seconds"] = seconds
        entry["rows"] = event.get("rows")
    else:
        entry.update({k: event[k] for k in ("action", "seconds", "rows", "key", "rebuilt_because") if k in event})
    return True


def _stage_need_text(config: PipelineConfig, name: str) -> str:
    """Roughly what the stage writes, for the message a full disk gets (engine/disk.py)."""
    from trainpipe.engine.disk import estimate

    found = estimate(config, [name])
    need = found.of(name) if found else None
    return f"this stage writes {need.line()}" if need else "the stage's size is unknown (a Hub model not cached)"


def _launcher(config: PipelineConfig, name: str) -> dict[str, Any] | None:
    launcher = getattr(getattr(config, name), "launcher", None)  # merge has none: it stays one process
    return launcher.model_dump() if launcher is not None else None


def _record_output(ledger: Ledger, run_id: str, name: str, attempt_id: int, result: dict[str, Any]) -> None:
    """The stage's output is in place: record its metrics and enter `validating`."""
    metrics = result.get("metrics", {})
    ledger.record_metrics(run_id, name, attempt_id, _metric_rows(result.get("log_history", [])))
    ledger.close_attempt(attempt_id, "validating", metrics={**metrics, "final_model_path": result.get("final_model_path")})
    ledger.transition_stage(run_id, name, "validate", _fsm("stage", "validate"), output_path=result["output_path"])
    _fault_point(f"{name}:validate")


def _validate(ledger: Ledger, run_id: str, config: PipelineConfig, name: str, attempt_id: int,
              outcome: ChildOutcome, observer: Observer, work_dir: Path) -> StageEnd:
    result = outcome.result
    metrics = result.get("metrics", {})
    attempt_metrics = {**metrics, "final_model_path": result.get("final_model_path")}
    if next(s for s in ledger.stages(run_id) if s["name"] == name)["state"] != "validating":
        _record_output(ledger, run_id, name, attempt_id, result)  # a stage without a gate
    gate = GateOutcome.from_rows(result["gate"]["gate"], result["gate"]["checks"]) if result.get("gate") else None
    if gate is not None:
        ledger.record_gate(run_id, name, attempt_id, gate.gate, gate.passed, gate.as_rows())
    if gate is not None and not gate.passed:
        failed = ", ".join(c.name for c in gate.failed if c.severity == "error")
        ledger.close_attempt(attempt_id, "rejected", exit_code=outcome.exit_code, metrics=attempt_metrics)
        ledger.transition_stage(run_id, name, "reject", _fsm("stage", "reject"), detail={"failed_checks": failed})
        observer.stage_finished(name, "rejected", metrics, gate, f"gate {gate.gate} failed: {failed}")
        return StageEnd("rejected", f"gate {gate.gate} failed: {failed}", gate)
    files = checkpoints.hash_tree(Path(result["output_path"]))
    ledger.record_artifacts(run_id, name, [(str(Path(result["output_path"]) / rel), size, digest)
                                           for rel, size, digest in files])
    ledger.close_attempt(attempt_id, "passed", exit_code=outcome.exit_code, metrics=attempt_metrics)
    ledger.transition_stage(run_id, name, "pass_gate", _fsm("stage", "pass_gate"),
                            detail={"gate": gate.gate if gate else None})
    ledger.update_run(run_id, final_model_path=result.get("final_model_path"))
    _fault_point(f"{name}:pass_gate")
    if not config.save_intermediate:
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    observer.stage_finished(name, "passed", metrics, gate, None)
    return StageEnd("passed", None, gate)


def _metric_rows(history: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    rows = []
    for entry in history:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((step, key, value))
    return rows
