"""Read models for `status` and `inspect`, assembled from the ledger. Plain dicts: the CLI renders
them as tables or JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainpipe.engine import cache, liveness
from trainpipe.paths import check_run_id

if TYPE_CHECKING:
    from trainpipe.store.reader import LedgerReader


def status_rows(ledger: LedgerReader, *, show_all: bool = False, limit: int = 20, offset: int = 0,
                mark_abandoned: bool = True, **filters: Any) -> list[dict[str, Any]]:
    """The `status` table. `filters` are list_runs' (states, pipeline, sweep, id_contains). With
    `mark_abandoned` (the CLI), a run whose owner is gone is recorded as interrupted; without it (the
    read-only web UI) it is only shown as interrupted."""
    now = time.time()
    runs = ledger.list_runs(limit=None if show_all else limit, offset=offset, **filters)
    runs = settled(ledger, runs, now, mark_abandoned)
    progress = ledger.stage_progress([r["run_id"] for r in runs])
    jobs = ledger.latest_jobs([r["run_id"] for r in runs])
    rows = []
    for run in runs:
        done, total = progress.get(run["run_id"], (0, 0))
        end = run["finished_at"] or (now if run["state"] == "running" else run["updated_at"])
        rows.append({
            "run_id": run["run_id"],
            "pipeline_id": run["pipeline_id"],
            "state": run["state"],
            "current_stage": run["current_stage"],
            "stages_done": done,
            "stages_total": total,
            "started_at": run["created_at"],
            "duration_s": round(end - run["created_at"], 1),
            "owner": f"pid {run['owner_pid']} on {run['owner_host']}" if run["owner_pid"] else None,
            "error": run["error"],
            "error_kind": run["error_kind"],
            "job": job_view(run, jobs.get(run["run_id"])),
        })
    return rows


def job_view(run: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's newest scheduler job (Slurm) and whether the run waits in its queue: it is
    interrupted, and that job asked to be requeued."""
    if job is None:
        return None
    return {"scheduler": job["scheduler"], "job_id": job["job_id"], "restart_count": job["restart_count"],
            "nodes": job["nodes"], "end_reason": job["end_reason"],
            "queued": run["state"] == "interrupted" and bool(job["requeued"])}


def stage_source(stage: dict[str, Any], has_attempts: bool) -> str | None:
    """How a stage got its output: "trained" in this run, "cached" (reused), or None (none yet)."""
    if stage["state"] == "cached":
        return "cached"
    return "trained" if has_attempts else None


def settled(ledger: LedgerReader, runs: list[dict[str, Any]], now: float, mark_abandoned: bool) -> list[dict[str, Any]]:
    """The runs with a dead owner's `running` shown as `interrupted`: recorded so (liveness.reconcile)
    when `mark_abandoned`, else only in the rows returned, with the reason in `owner_gone`."""
    if mark_abandoned:
        return liveness.reconcile(ledger, runs, now)
    shown = []
    for run in runs:
        reason = liveness.owner_gone(run, now) if run["state"] == "running" else None
        shown.append({**run, "state": "interrupted", "owner_gone": reason} if reason else run)
    return shown


def run_report(ledger: LedgerReader, run_id: str, *, mark_abandoned: bool = True) -> dict[str, Any]:
    run = ledger.get_run(check_run_id(run_id))
    run = settled(ledger, [run], time.time(), mark_abandoned)[0]
    attempts = ledger.attempts(run_id)
    checkpoints = ledger.checkpoints(run_id)
    gates = ledger.gates(run_id)
    curves = metric_curves(ledger.metrics(run_id))
    jobs = ledger.scheduler_jobs(run_id)
    transitions = ledger.transitions(run_id)
    stages = []
    for stage in ledger.stages(run_id):
        name = stage["name"]
        mine = [a for a in attempts if a["stage"] == name]
        gate = next((g for g in reversed(gates) if g["stage"] == name), None)
        metrics = (mine[-1]["metrics"] or {}) if mine else {}
        trained_in = None
        if stage["state"] == "cached":
            metrics, trained_in = cache.origin_metrics(ledger, run_id, name, run["run_dir"])
        stages.append({
            "name": name,
            "state": stage["state"],
            "source": stage_source(stage, bool(mine)),
            "cached_from": {"run_id": stage["cached_from_run"], "stage": stage["cached_from_stage"],
                            "trained_in": trained_in} if stage["state"] == "cached" else None,
            "cache_note": stage["cache_note"],
            "fingerprint": stage["fingerprint"],
            "attempts": len(mine),
            "output_path": stage["output_path"],
            "metrics": metrics,
            "attempt_history": [{
                "attempt": a["attempt"], "outcome": a["outcome"], "started_at": a["started_at"],
                "finished_at": a["finished_at"],
                "duration_s": round((a["finished_at"] or time.time()) - a["started_at"], 2),
                "exit_code": a["exit_code"], "error": a["error"], "error_kind": a["error_kind"],
                "traceback": a["error_traceback"], "resumed_from": a["resumed_from"],
                "overrides": a["overrides"] or {}, "worker": a.get("worker"),
                "data": (a.get("metrics") or {}).get("data") or {},
            } for a in mine],
            "checkpoints": [{"step": c["step"], "path": c["path"], "attempt_id": c["attempt_id"]}
                            for c in checkpoints if c["stage"] == name],
            # Checkpoints a resume passed over, and why (recorded with the stage's `start` transitions).
            "skipped_checkpoints": [entry for t in transitions if t["stage"] == name and t["trigger"] == "start"
                                    for entry in (t["detail"] or {}).get("skipped_checkpoints", [])],
            "curves": curves.get(name, {}),
            "gate": None if gate is None else {
                "name": gate["gate"], "passed": bool(gate["passed"]), "carried_from": gate["carried_from"],
                "checks": [{k: c[k] for k in ("name", "passed", "severity", "mode", "value", "threshold",
                                               "duration_s", "details")} for c in gate["checks"]],
            },
        })
    return {
        "run_id": run["run_id"],
        "pipeline_id": run["pipeline_id"],
        "state": run["state"],
        "created_at": run["created_at"],
        "finished_at": run["finished_at"],
        "run_dir": run["run_dir"],
        "final_model_path": run["final_model_path"],
        "error": run["error"],
        "error_kind": run["error_kind"],
        "traceback": run["error_traceback"],
        "owner": {"pid": run["owner_pid"], "host": run["owner_host"], "heartbeat_at": run["heartbeat_at"],
                  "gone": run.get("owner_gone")},
        "config": run["config_snapshot"],
        "scheduler_jobs": [{k: j[k] for k in ("scheduler", "job_id", "restart_count", "nodes", "host", "pid",
                                              "started_at", "ended_at", "end_reason", "requeued")} for j in jobs],
        "job": job_view(run, jobs[-1] if jobs else None),
        "lineage": lineage_view(run, ledger.artifacts(run_id)),
        "stages": stages,
        "transitions": [{k: t[k] for k in ("id", "stage", "from_state", "to_state", "trigger", "at", "pid",
                                           "host", "detail")} for t in transitions],
    }


def lineage_view(run: dict[str, Any], artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's lineage record (engine/lineage.py; empty for a run created before it was recorded),
    with the sha256 and size of every artifact from the artifacts table. A path recorded twice (a
    stage re-run after a kill) keeps its last row, as `verify` does."""
    latest: dict[str, dict[str, Any]] = {}
    for row in artifacts:
        latest[row["path"]] = row
    return {**(run.get("lineage") or {}), "recorded": run.get("lineage") is not None,
            "artifacts": [{k: row[k] for k in ("stage", "path", "size_bytes", "sha256")} for row in latest.values()]}


# What `inspect` draws per stage (sparklines, --plot): the training loss and DPO's reward margins.
CURVES = ("loss", "rewards/margins", "rewards/accuracies")


def metric_curves(metrics: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """stage -> metric -> [[step, value], ...]. A resumed stage logged some steps twice (once per
    attempt): the later attempt's value wins, as it is the one the final weights descend from."""
    by_step: dict[str, dict[str, dict[int, float]]] = {}
    for row in metrics:  # in id order, so later attempts overwrite earlier ones
        if row["name"] in CURVES and row["value"] is not None:
            by_step.setdefault(row["stage"], {}).setdefault(row["name"], {})[row["step"]] = row["value"]
    return {stage: {name: [[step, values[step]] for step in sorted(values)] for name, values in series.items()}
            for stage, series in by_step.items()}


def live_progress(run_dir: str, stage: str, attempt: int) -> dict[str, Any] | None:
    """The newest step/total the running attempt's trainer reported, read from the attempt's event
    stream (`<run dir>/.work/<stage>/events-<attempt>.jsonl`, the file the CLI's progress bar follows).
    The ledger records metrics only when a stage ends; None where the file is not reachable (a run on
    another machine) or has no progress yet."""
    path = Path(run_dir) / ".work" / stage / f"events-{attempt}.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            tail = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut, the last one half-written
        if isinstance(event, dict) and event.get("type") in ("progress", "log") and event.get("total"):
            return {"step": int(event.get("step", 0)), "total": int(event["total"]),
                    "loss": (event.get("logs") or {}).get("loss"), "at": event.get("time")}
    return None


def gate_generations(run_dir: str, stage: str, attempts: list[int], limit: int = 1000) -> list[dict[str, Any]]:
    """The outputs the stage's gate generated and scored, as its worker saved them
    (`<run dir>/.work/<stage>/generations-<attempt>.jsonl`, newest attempt that has one), those a
    check found a problem in first. Empty for a stage without one, or a run dir out of reach."""
    for attempt in sorted(attempts, reverse=True):
        path = Path(run_dir) / ".work" / stage / f"generations-{attempt}.jsonl"
        try:
            with open(path, encoding="utf-8") as handle:
                rows = [json.loads(line) for line, _ in zip(handle, range(limit)) if line.strip()]
        except (OSError, ValueError):
            continue
        return sorted(rows, key=lambda row: row.get("problem") is None)
    return []
