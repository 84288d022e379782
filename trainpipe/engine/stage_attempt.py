"""One stage, attempt by attempt: choose the checkpoint to resume from, start the stage's process and
supervise it, record what it reports (checkpoints, data phases, metrics), take its gate's verdict,
and retry what a retry can fix (an OOM with half the micro-batch, a crash after a backoff)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from trainpipe import checkpoints, failures, faults
from trainpipe.config import PipelineConfig
from trainpipe.engine import identity
from trainpipe.engine.machine import advance
from trainpipe.engine.observer import Observer, StageEnd
from trainpipe.engine.resume_point import choose_resume_point
from trainpipe.engine.stop import StopFlag
from trainpipe.engine.stage_process import StageWorkers
from trainpipe.engine.supervisor import ChildOutcome, run_child
from trainpipe.paths import inside
from trainpipe.stages import OUTPUT_DIRS
from trainpipe.stages.base import StageSpec
from trainpipe.store.ledger import Ledger
from trainpipe.validators.gate import GateOutcome

RETRY_BACKOFF_S = float(os.environ.get("TRAINPIPE_RETRY_BACKOFF_S", "5"))


def stage_inputs(ledger: Ledger, run_id: str, config: PipelineConfig, name: str) -> dict[str, str | None]:
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


def oom_overrides(config: PipelineConfig, name: str, previous: dict[str, Any]) -> dict[str, Any]:
    """Halve the micro-batch and double accumulation, so the effective batch stays the same."""
    settings = getattr(config, name)
    batch = previous.get("batch_size", settings.batch_size)
    accumulation = previous.get("gradient_accumulation", settings.gradient_accumulation)
    if batch <= 1:
        return previous
    return {**previous, "batch_size": batch // 2, "gradient_accumulation": accumulation * 2}


def run_stage(ledger: Ledger, run_id: str, config: PipelineConfig, run_dir: Path, name: str,
               observer: Observer, stop: StopFlag, workers: StageWorkers) -> StageEnd:
    entry = config.stage(name)
    work_dir = inside(run_dir, ".work", name)
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir = inside(run_dir, OUTPUT_DIRS[name])
    overrides: dict[str, Any] = {}
    for attempt_index in range(entry.retry_count + 1):
        resume_from, skipped, adopted = choose_resume_point(
            ledger, run_id, name, work_dir / "checkpoints",
            identity.world_size(getattr(config, name).model_dump(mode="json")))
        detail: dict[str, Any] = {"resume_from": resume_from}
        if skipped:
            detail["skipped_checkpoints"] = skipped
        if adopted:
            detail["adopted_checkpoints"] = adopted
        if overrides:
            detail["overrides"] = overrides
        ledger.transition_stage(run_id, name, "start", advance("stage", "start"), detail=detail)
        attempt_id, attempt_no = ledger.open_attempt(run_id, name, resumed_from=resume_from, overrides=overrides)
        observer.stage_started(name, attempt_no, resume_from)
        for passed_over in skipped:  # a damaged checkpoint (a full disk, a kill mid-save) is said, not hidden
            observer.note(f"{name}: checkpoint passed over: {passed_over}")
        faults.orchestrator_point(f"{name}:start")
        spec = StageSpec(stage=name, run_id=run_id, attempt=attempt_no, config=config.model_dump(mode="json"),
                         run_dir=str(run_dir), output_dir=str(output_dir), work_dir=str(work_dir),
                         events_path=str(work_dir / f"events-{attempt_no}.jsonl"),
                         result_path=str(work_dir / f"result-{attempt_no}.json"),
                         inputs=stage_inputs(ledger, run_id, config, name), resume_from=resume_from,
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
                faults.orchestrator_point(f"{name}:checkpoint_written", int(event["step"]))
                ledger.record_checkpoint(run_id, name, _attempt_id, int(event["step"]), event["path"],
                                         event.get("manifest_sha256"))
                faults.orchestrator_point(f"{name}:checkpoint", int(event["step"]))
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
        ledger.transition_stage(run_id, name, "fail", advance("stage", "fail"),
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
            overrides = oom_overrides(config, name, overrides)
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
    """Roughly what the stage writes, for the message a full disk gets (stages/footprint.py)."""
    from trainpipe.stages.footprint import estimate

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
    ledger.transition_stage(run_id, name, "validate", advance("stage", "validate"), output_path=result["output_path"])
    faults.orchestrator_point(f"{name}:validate")


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
        ledger.transition_stage(run_id, name, "reject", advance("stage", "reject"), detail={"failed_checks": failed})
        observer.stage_finished(name, "rejected", metrics, gate, f"gate {gate.gate} failed: {failed}")
        return StageEnd("rejected", f"gate {gate.gate} failed: {failed}", gate)
    files = _output_hashes(result)
    ledger.record_artifacts(run_id, name, [(str(Path(result["output_path"]) / rel), size, digest)
                                           for rel, size, digest in files])
    ledger.close_attempt(attempt_id, "passed", exit_code=outcome.exit_code, metrics=attempt_metrics)
    ledger.transition_stage(run_id, name, "pass_gate", advance("stage", "pass_gate"),
                            detail={"gate": gate.gate if gate else None})
    ledger.update_run(run_id, final_model_path=result.get("final_model_path"))
    faults.orchestrator_point(f"{name}:pass_gate")
    if not config.save_intermediate:
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    observer.stage_finished(name, "passed", metrics, gate, None)
    return StageEnd("passed", None, gate)


def _output_hashes(result: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(path relative to the output, size, sha256) of each output file. The stage process hashed them
    beside its gate (attempt/worker.py); those hashes are used when the output holds exactly those
    files, each with the size and mtime it had when hashed. Otherwise (a file added, changed or
    gone since, or no hashes reported) the output is hashed here."""
    root = Path(result["output_path"])
    reported = result.get("output_files")
    if reported:
        now = {str(p.relative_to(root)): p.stat() for p in checkpoints.tree_files(root)}
        if set(now) == {rel for rel, *_ in reported} and all(
                now[rel].st_size == size and now[rel].st_mtime_ns == mtime_ns for rel, size, _, mtime_ns in reported):
            return sorted((rel, size, digest) for rel, size, digest, _ in reported)
    return checkpoints.hash_tree(root)


def _metric_rows(history: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    rows = []
    for entry in history:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((step, key, value))
    return rows
