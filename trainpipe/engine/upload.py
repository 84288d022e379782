"""The upload step: after DPO, push the final model to `hub_repo_id` through the stage machine (hub.py
does the pushing). Never cached and never fingerprinted: pushing is an effect, not an output."""

from __future__ import annotations

from trainpipe.config import UPLOAD_STAGE, PipelineConfig
from trainpipe.engine import hub
from trainpipe.engine.machine import advance
from trainpipe.engine.observer import Observer, StageEnd
from trainpipe.store.ledger import Ledger


def upload_stage(ledger: Ledger, run_id: str, config: PipelineConfig, observer: Observer) -> StageEnd:
    """Push the run's final model to `hub_repo_id` through the stage machine (start, validate, pass_gate
    or fail); one attempt per drive, so a failure ends the run at once and a resume retries only this."""
    folder = ledger.get_run(run_id)["final_model_path"]
    repo_id = config.hub_repo_id or ""
    ledger.transition_stage(run_id, UPLOAD_STAGE, "start", advance("stage", "start"),
                            detail={"repo_id": repo_id, "folder": folder})
    attempt_id, attempt_no = ledger.open_attempt(run_id, UPLOAD_STAGE)
    observer.stage_started(UPLOAD_STAGE, attempt_no, None)
    try:
        commit = hub.push(folder, repo_id, run_id)
    except hub.UploadFailed as exc:
        error = (f"upload to hub failed: {exc.message}; the trained model is untouched at {folder}; "
                 f"`trainpipe resume {run_id}` retries the upload only")
        ledger.close_attempt(attempt_id, "failed", error=error, error_kind=exc.kind)
        ledger.transition_stage(run_id, UPLOAD_STAGE, "fail", advance("stage", "fail"),
                                detail={"kind": "failed", "error_kind": exc.kind, "error": error})
        observer.stage_finished(UPLOAD_STAGE, "failed", {}, None, error)
        return StageEnd("failed", error, None, exc.kind)
    ledger.transition_stage(run_id, UPLOAD_STAGE, "validate", advance("stage", "validate"), detail=commit)
    ledger.close_attempt(attempt_id, "passed", metrics=commit)
    ledger.transition_stage(run_id, UPLOAD_STAGE, "pass_gate", advance("stage", "pass_gate"), detail=commit)
    observer.stage_finished(UPLOAD_STAGE, "passed", commit, None, None)
    observer.note(f"uploaded {folder} to {repo_id}: {commit['commit_url']}")
    return StageEnd("passed")
