"""Kill `trainpipe run` for real and resume it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import (assert_continued_from_checkpoint, cli, cli_json, descendants, only_run_id, process_alive,
                     stage_states, start_run, started_pid, trainer_steps, wait_for)

from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def _start_run(tmp_path, extra: list[str] | None = None, db: str | None = None, fault: dict | None = None):
    return start_run(QUICKSTART, fast_overrides(tmp_path / "out") + (extra or []), db=db, fault=fault)


# On PostgreSQL too: the run, `status` and `resume` each name the server's database with --db.
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_sigkill_after_sft_then_resume_reuses_sft(tmp_path, db_url):
    # DPO holds step 2 for 120 s (once), so its stage process is surely alive, mid-training, at the kill.
    fault = {"stage": "dpo", "step": 2, "action": "pause", "seconds": 120, "once_file": str(tmp_path / "fired")}
    proc = _start_run(tmp_path, db=db_url, fault=fault)
    run_id = wait_for(lambda: only_run_id(db_url), timeout=60, what="the run row")
    wait_for(lambda: (tmp_path / "fired").exists(), what="DPO to be mid-training")
    assert stage_states(db_url, run_id)["sft"] == "passed"
    # The real stage process: the pid it wrote into its own events file, the one the ledger holds for
    # the running attempt, and a descendant of `trainpipe run` (through the pre-imported worker).
    [running] = [a for a in Ledger(db_url).attempts(run_id) if a["outcome"] == "running"]
    run_dir = Ledger(db_url).get_run(run_id)["run_dir"]
    stage_pid = started_pid(run_dir, "dpo", running["attempt"])
    below = descendants(proc.pid)
    assert stage_pid == running["pid"] and stage_pid != proc.pid, (stage_pid, running["pid"], proc.pid)
    assert stage_pid in below and process_alive(stage_pid), (stage_pid, below)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # The stage child dies with its parent (PR_SET_PDEATHSIG), so nothing trains on unobserved; so does
    # every other process `trainpipe run` had started (the pre-imported worker).
    wait_for(lambda: not any(process_alive(p) for p in below), timeout=30,
             what=f"the stage process {stage_pid} and the rest of {sorted(below)} to exit")

    # Never shown as running once its owner is gone: status marks it interrupted (compare-and-set).
    status = cli("status", "--db", db_url)
    assert status.returncode == 0
    assert f"trainpipe resume {run_id}" in status.stdout
    rows = cli_json("status", "--db", db_url)
    assert [(r["run_id"], r["state"]) for r in rows] == [(run_id, "interrupted")]
    ledger = Ledger(db_url)
    interrupts = [t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt" and t["stage"] is None]
    assert len(interrupts) == 1 and "gone" in interrupts[0]["detail"]["reason"]

    resumed = cli("resume", run_id, "--db", db_url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert stage_states(db_url, run_id) == {"sft": "passed", "merge": "passed", "dpo": "passed"}
    by_stage: dict[str, list] = {}
    for attempt in ledger.attempts(run_id):
        by_stage.setdefault(attempt["stage"], []).append(attempt["outcome"])
    assert by_stage["sft"] == ["passed"], "SFT passed before the kill and must not run again"
    assert by_stage["dpo"][-1] == "passed"
    assert ledger.get_run(run_id)["state"] == "succeeded"
    # Resuming twice is refused: the run is finished.
    assert cli("resume", run_id, "--db", db_url).returncode == 2


# CI runs the SIGTERM case (a scheduler's preemption); Ctrl-C takes the same path and runs in `make matrix`.
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.extended), signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_checkpoints_at_the_step_boundary_exits_130_and_the_run_resumes(sig, tmp_path, db_url):
    """Ctrl-C or SIGTERM (a scheduler's preemption) to a single-process run: the orchestrator asks the
    stage to checkpoint and stop, exits 130, the run is interrupted, and `resume` goes on from there."""
    # SFT holds step 3 for 8 s (once), so the signal surely lands mid-training; no periodic checkpoint
    # (every 1000 steps), so any checkpoint is the one the signal asked for.
    fault = {"stage": "sft", "step": 3, "action": "pause", "seconds": 8, "once_file": str(tmp_path / "fired")}
    proc = _start_run(tmp_path, ["stages.merge.enabled=false", "stages.dpo.enabled=false",
                                 "checkpoint_every_n_steps=1000"], fault=fault)
    run_id = wait_for(lambda: only_run_id(db_url), timeout=60, what="the run row")
    wait_for(lambda: (tmp_path / "fired").exists(), what="SFT to be at step 3")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "interrupted"
    assert [a["outcome"] for a in ledger.attempts(run_id, "sft")] == ["interrupted"]
    # The stage saved one checkpoint, at the boundary of the step it was on, and trained no further:
    # the trainer's own record ends at step 3, and the checkpoint's trainer_state.json says 3.
    (checkpoint,) = ledger.checkpoints(run_id, "sft")
    _began, finished = trainer_steps(ledger.get_run(run_id)["run_dir"], "sft", 1)
    assert finished == [1, 2, 3] and checkpoint["step"] == 3
    assert json.loads((Path(checkpoint["path"]) / "trainer_state.json").read_text())["global_step"] == 3

    resumed = cli("resume", run_id)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ledger.get_run(run_id)["state"] == "succeeded"
    assert [a["outcome"] for a in ledger.attempts(run_id, "sft")] == ["interrupted", "passed"]
    assert assert_continued_from_checkpoint(ledger, run_id, "sft") == 3
