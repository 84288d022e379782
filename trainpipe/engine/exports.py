"""Lesson-shaped result files, written from the ledger at the end of every run.

The ledger is the source of truth; these files exist so the lesson's downstream scripts keep
working. Layout: `<output_dir>/<run_id>/pipeline_result.json` plus `sft/metrics.json`,
`merged/merge_info.json` and `dpo/metrics.json` inside the run directory, and a copy of the latest
run's `pipeline_result.json` at `<output_dir>/pipeline_result.json`, where the lesson wrote it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainpipe.engine.cache import origin_metrics as stage_metrics
from trainpipe.engine.report import lineage_view
from trainpipe.stages.base import write_json_atomic
from trainpipe.store.ledger import Ledger

STAGE_FILES = {"sft": ("sft", "metrics.json"), "merge": ("merged", "merge_info.json"), "dpo": ("dpo", "metrics.json")}


def _latest_attempts(ledger: Ledger, run_id: str) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for attempt in ledger.attempts(run_id):
        latest[attempt["stage"]] = attempt
    return latest


def stage_file_payload(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    if stage == "sft":
        return {"final_loss": metrics.get("final_loss"), "total_steps": metrics.get("total_steps"),
                "epochs_completed": metrics.get("epochs_completed"),
                "samples_processed": metrics.get("samples_processed")}
    if stage == "merge":
        return {key: metrics.get(key) for key in
                ("base_model", "adapter_path", "merged_path", "size_gb", "merge_time_seconds")}
    return {"final_loss": metrics.get("final_loss"), "total_steps": metrics.get("total_steps"),
            "beta_used": metrics.get("beta_used"),
            **{k: v for k, v in metrics.items() if k.startswith("rewards/")}}


def pipeline_result(ledger: Ledger, run_id: str, as_if: dict[str, Any] | None = None) -> dict[str, Any]:
    """`as_if`: run fields as they will be once the run reaches its final state (finish.finish)."""
    run = {**ledger.get_run(run_id), **(as_if or {})}
    stages = {s["name"]: s for s in ledger.stages(run_id)}
    attempts = _latest_attempts(ledger, run_id)
    stage_results: dict[str, Any] = {}
    for name, row in stages.items():
        attempt = attempts.get(name)
        if row["state"] == "cached":
            metrics, trained_in = stage_metrics(ledger, run_id, name, run["run_dir"])
            # trainpipe additions: how the stage got its output. The time is the reuse's, not the training's.
            entry: dict[str, Any] = {"success": True, "time_seconds": 0.0, "source": "cached",
                                     "reused_from": {"run_id": row["cached_from_run"],
                                                     "stage": row["cached_from_stage"], "trained_in": trained_in}}
        elif attempt is not None:
            metrics = attempt.get("metrics") or {}
            entry = {"success": row["state"] == "passed",
                     "time_seconds": (attempt["finished_at"] or attempt["started_at"]) - attempt["started_at"],
                     "source": "trained"}
            if row["cache_note"]:
                entry["cache_note"] = row["cache_note"]
        else:
            continue
        if name == "merge":
            entry["size_gb"] = metrics.get("size_gb")
        elif name == "upload":
            entry.update({k: metrics.get(k) for k in ("repo_id", "commit_url", "commit_oid")})
            if attempt is not None and attempt.get("error"):
                entry["error"] = attempt["error"]
        else:
            entry["loss"] = metrics.get("final_loss")
        stage_results[name] = entry
    errors = [e for e in (run.get("error") or "").split("; ") if e]
    finished = run["finished_at"] or run["updated_at"]
    return {
        "success": run["state"] == "succeeded",
        "pipeline_id": run["pipeline_id"],
        "final_model_path": run["final_model_path"] if run["state"] == "succeeded" else None,
        "stages_completed": [s for s, row in stages.items() if row["state"] in ("passed", "cached")],
        "total_time_seconds": finished - run["created_at"],
        "stage_results": stage_results,
        "errors": errors,
        "timestamp": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        # trainpipe additions; the lesson's readers ignore unknown keys
        "run_id": run_id,
        "state": run["state"],
        "lineage": lineage_view(run, ledger.artifacts(run_id)),
    }


def write_exports(ledger: Ledger, run_id: str, as_if: dict[str, Any] | None = None) -> dict[str, Any]:
    run = ledger.get_run(run_id)
    run_dir = Path(run["run_dir"])
    result = pipeline_result(ledger, run_id, as_if)
    attempts = _latest_attempts(ledger, run_id)
    for row in ledger.stages(run_id):
        name = row["name"]
        if name not in STAGE_FILES:
            continue  # upload: nothing of its own on disk; its commit is in pipeline_result.json
        folder, filename = STAGE_FILES[name]
        if row["state"] == "cached":
            metrics = stage_metrics(ledger, run_id, name, run["run_dir"])[0]
        elif name in attempts:
            metrics = attempts[name].get("metrics") or {}
        else:
            continue
        if (run_dir / folder).is_dir():
            write_json_atomic(run_dir / folder / filename, stage_file_payload(name, metrics))
    write_json_atomic(run_dir / "pipeline_result.json", result)
    write_json_atomic(Path(run["output_dir"]) / "pipeline_result.json", result)
    return result
