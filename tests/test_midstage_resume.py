"""Mid-stage resume: a run killed mid-SFT or mid-DPO resumes from its newest verified checkpoint
and ends with weights bit-identical to an uninterrupted run of the same config."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, resume_overrides
from helpers import (assert_continued_from_checkpoint, attempts_per_stage, assert_identical, cli, final_weights, only_run_id,
                     passed_stage_attempts, start_run, wait_for)

import trainpipe
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage,step", [("sft", 7), pytest.param("dpo", 3, marks=pytest.mark.extended)])
def test_orchestrator_sigkill_mid_stage_resumes_bit_identical(stage, step, tmp_path, db_url, reference_weights):
    # The stage pauses at `step` (after the checkpoint at step-1), so the kill lands mid-training.
    fault = {"stage": stage, "step": step, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, resume_overrides(tmp_path / "out"), fault)
    wait_for(lambda: (tmp_path / "fired").exists(), what=f"{stage} to reach step {step}")
    run_id = only_run_id(db_url)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ledger = Ledger(db_url)
    passed_before = passed_stage_attempts(ledger, run_id)

    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = ledger.attempts(run_id, stage)
    assert [a["outcome"] for a in attempts] == ["interrupted", "passed"]
    resumed_from = attempts[1]["resumed_from"]
    assert resumed_from and resumed_from.endswith(f"checkpoint-{step - 1}"), resumed_from
    # The trainer itself went on from step-1 (training is deterministic, so equal weights alone could
    # not tell a resume from a silent restart at step 1).
    assert assert_continued_from_checkpoint(ledger, run_id, stage) == step - 1
    # What had passed before the kill ran no attempt again.
    after = attempts_per_stage(ledger, run_id)
    assert {s: after[s] for s in passed_before} == passed_before
    assert_identical(reference_weights, final_weights(Path(ledger.get_run(run_id)["run_dir"])))


def test_stage_crash_retry_resumes_from_checkpoint_bit_identical(tmp_path, db_url, reference_weights, monkeypatch):
    """The stage process itself is SIGKILLed; the orchestrator's retry continues from the checkpoint."""
    fault = {"stage": "sft", "step": 5, "action": "sigkill", "once_file": str(tmp_path / "fired")}
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps(fault))
    result = trainpipe.run(QUICKSTART, overrides=resume_overrides(tmp_path / "out"))
    assert result.state == "succeeded", result.errors
    attempts = Ledger(db_url).attempts(result.run_id, "sft")
    assert [a["outcome"] for a in attempts] == ["failed", "passed"]
    assert "SIGKILL" in attempts[0]["error"]
    assert attempts[1]["resumed_from"].endswith("checkpoint-4")
    assert assert_continued_from_checkpoint(Ledger(db_url), result.run_id, "sft") == 4
    assert_identical(reference_weights, final_weights(Path(result.run_dir)))


@pytest.mark.extended  # CI's budget: `make matrix` runs it
def test_corrupt_newest_checkpoint_is_skipped_with_reason(tmp_path, db_url, reference_weights):
    fault = {"stage": "sft", "step": 7, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, resume_overrides(tmp_path / "out"), fault)
    wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach step 7")
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    # The orchestrator records checkpoint-6 when it next reads the events file; kill it after that.
    wait_for(lambda: any(c["step"] == 6 for c in ledger.checkpoints(run_id, "sft")), what="checkpoint-6 recorded")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    newest = max(ledger.checkpoints(run_id, "sft"), key=lambda c: c["step"])
    assert newest["step"] == 6
    weights = Path(newest["path"]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # bit rot in the newest checkpoint

    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = ledger.attempts(run_id, "sft")
    assert attempts[-1]["resumed_from"].endswith("checkpoint-4")
    assert assert_continued_from_checkpoint(ledger, run_id, "sft") == 4
    start = [t for t in ledger.transitions(run_id) if t["stage"] == "sft" and t["trigger"] == "start"][-1]
    assert "does not match its sha256" in start["detail"]["skipped_checkpoints"][0]
    # Said where the user looks: the resume's own output, and `inspect`.
    assert f"sft: checkpoint passed over: {newest['path']}" in " ".join(resumed.stdout.split())
    shown = " ".join(cli("inspect", run_id, check=True).stdout.split())
    assert f"checkpoint passed over: {newest['path']}" in shown and "does not match its sha256" in shown
    assert_identical(reference_weights, final_weights(Path(ledger.get_run(run_id)["run_dir"])))
