"""The fault-injection matrix: SIGKILL the orchestrator right after every ledger transition, and the
stage process at its start, mid-training, between the steps of its output's rename (SFT) and during
its gate, in every stage. Every scenario must end `succeeded` with weights bit-identical to the
uninterrupted reference run (max abs diff == 0), and a transition history without gaps.

CI runs a representative subset; TRAINPIPE_FULL_MATRIX=1 runs all of it (about 20 minutes on
2 cores). docs/fault-tolerance.md (Reliability) reports the last full run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, resume_overrides
from helpers import (assert_continued_from_checkpoint, assert_every_resume_continued, assert_identical,
                     assert_transitions_gap_free, attempts_per_stage, cli, final_weights, only_run_id,
                     passed_stage_attempts, process_alive, start_run, started_pid, wait_for)

from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow

# Orchestrator kills: right after the named ledger write (checkpoint: after recording that step).
ORCHESTRATOR_POINTS = [
    ("run:start", None), ("sft:start", None), ("sft:checkpoint", 6), ("sft:validate", None),
    ("sft:checkpoint_written", 6), ("sft:pass_gate", None), ("merge:start", None), ("merge:validate", None), ("merge:pass_gate", None),
    ("dpo:start", None), ("dpo:checkpoint", 4), ("dpo:validate", None), ("dpo:pass_gate", None),
]
# Stage-process kills: before the stage's work, at a training step, between removing the old output and
# renaming the staging dir into place (faults.at_point "rename"), or while its gate runs.
STAGE_POINTS = [
    ("sft", {"at": "start"}), ("sft", {"step": 5}), ("sft", {"at": "rename"}), ("sft", {"at": "gate"}),
    ("merge", {"at": "start"}), ("merge", {"at": "gate"}),
    ("dpo", {"at": "start"}), ("dpo", {"step": 3}), ("dpo", {"at": "gate"}),
]
# dpo:checkpoint is left to the full matrix: test_midstage_resume.py kills the orchestrator mid-DPO in CI.
# sft:checkpoint_written runs in `make matrix` with the rest: CI's budget keeps one kill of each kind.
IN_CI = {"sft:validate", "merge-gate"}
FULL = os.environ.get("TRAINPIPE_FULL_MATRIX") == "1"


def _selected(cases, ids):
    return [pytest.param(*case, id=i, marks=() if FULL or i in IN_CI else pytest.mark.skip(
        reason="full matrix only (TRAINPIPE_FULL_MATRIX=1)")) for case, i in zip(cases, ids)]


def _run(tmp_path, fault: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINPIPE_FAULT": json.dumps({**fault, "once_file": str(tmp_path / "fired")})}
    args = [a for o in resume_overrides(tmp_path / "out") for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _assert_recovered(ledger: Ledger, run_id: str, reference_weights) -> None:
    run = ledger.get_run(run_id)
    assert run["state"] == "succeeded"
    assert {s["name"]: s["state"] for s in ledger.stages(run_id)} == {"sft": "passed", "merge": "passed",
                                                                      "dpo": "passed"}
    assert_transitions_gap_free(ledger, run_id)
    assert_every_resume_continued(ledger, run_id)
    assert_identical(reference_weights, final_weights(Path(run["run_dir"])))


@pytest.mark.parametrize("point,step", _selected(ORCHESTRATOR_POINTS, [p for p, _s in ORCHESTRATOR_POINTS]))
def test_orchestrator_killed_after_transition(point, step, tmp_path, db_url, reference_weights):
    killed = _run(tmp_path, {"action": "kill_orchestrator", "at": point, "step": step})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert (tmp_path / "fired").exists()
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    passed_before = passed_stage_attempts(ledger, run_id)

    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ledger.get_run(run_id)["state"] == "succeeded"
    # Counted from the ledger's attempts: a stage that had passed before the kill never ran again.
    after = attempts_per_stage(ledger, run_id)
    assert {s: after[s] for s in passed_before} == passed_before, (passed_before, after)
    if point.endswith(":checkpoint_written"):
        # The checkpoint the ledger never recorded was adopted (its manifest verified), and the trainer
        # went on from it: nothing complete on disk is thrown away.
        stage = point.split(":")[0]
        start = [t for t in ledger.transitions(run_id) if t["stage"] == stage and t["trigger"] == "start"][-1]
        assert any(f"checkpoint-{step}" in str(c) for c in start["detail"].get("adopted_checkpoints", [])), start
        assert assert_continued_from_checkpoint(ledger, run_id, stage) >= step
    if point.endswith(":checkpoint"):
        stage = point.split(":")[0]
        # The trainer's own record: the resumed attempt began at the recorded checkpoint, not at step 1.
        assert assert_continued_from_checkpoint(ledger, run_id, stage) >= step
    _assert_recovered(ledger, run_id, reference_weights)


# CI runs it in the second environment (make test-libmin), beside the main suite.
@pytest.mark.extended
def test_killed_between_the_steps_of_the_output_rename_resumes_bit_identical(tmp_path, db_url, reference_weights):
    """The machine dies while SFT moves its finished output into place: the orchestrator and the stage
    process are both SIGKILLed while the stage holds between removing the old output and renaming
    the staging dir (faults.at_point "rename"). `resume` must not take what is on disk for a
    finished output, and ends on the reference weights."""
    fault = {"stage": "sft", "at": "rename", "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = start_run(QUICKSTART, resume_overrides(tmp_path / "out"), fault)
    try:
        wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to reach the rename of its output")
        run_id = only_run_id(db_url)
        ledger = Ledger(db_url)
        run_dir = Path(ledger.get_run(run_id)["run_dir"])
        stage_pid = started_pid(run_dir, "sft", 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stage_pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(stage_pid), timeout=30, what="the SFT process to die")
    # What the kill left: the whole output still in staging, nothing at the output path.
    staging = run_dir / ".work" / "sft" / "output.tmp-1"
    assert (staging / "adapter_model.safetensors").is_file() and (staging / "trainpipe_stage.json").is_file()
    assert not (run_dir / "sft").exists()

    resumed = cli("resume", run_id)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [a["outcome"] for a in ledger.attempts(run_id, "sft")] == ["interrupted", "passed"]
    # The new attempt went on from the last checkpoint (step 12, the stage's last) and wrote and renamed
    # its own output.
    assert assert_continued_from_checkpoint(ledger, run_id, "sft", trains=False) == 12
    _assert_recovered(ledger, run_id, reference_weights)


@pytest.mark.parametrize("stage,where", _selected(
    STAGE_POINTS, [f"{s}-{w.get('at') or 'step' + str(w['step'])}" for s, w in STAGE_POINTS]))
def test_stage_process_killed(stage, where, tmp_path, db_url, reference_weights):
    done = _run(tmp_path, {"stage": stage, "action": "sigkill", **where})
    # The quickstart retries a stage once: the orchestrator recovers on its own, without a resume.
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "fired").exists()
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    attempts = ledger.attempts(run_id, stage)
    assert [a["outcome"] for a in attempts] == ["failed", "passed"]
    assert "SIGKILL" in attempts[0]["error"]
    if "step" in where:
        # Killed after a checkpoint: the retry's trainer went on from it (checkpoint every 2 steps).
        assert assert_continued_from_checkpoint(ledger, run_id, stage) == where["step"] - 1
    _assert_recovered(ledger, run_id, reference_weights)
