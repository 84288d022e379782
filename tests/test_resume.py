"""Kill `trainpipe run` for real and resume it."""

from __future__ import annotations

import signal

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import (cli, cli_json, descendants, only_run_id, process_alive, stage_states, start_run,
                     started_pid, wait_for)

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


def test_sigint_leaves_run_interrupted_and_resumable(tmp_path, db_url):
    """Ctrl-C: the orchestrator asks the stage to checkpoint and stop, exits 130, run is interrupted."""
    proc = _start_run(tmp_path, ["sft.max_steps=400", "checkpoint_every_n_steps=1000"])
    run_id = wait_for(lambda: only_run_id(db_url), timeout=60, what="the run row")
    ledger = Ledger(db_url)
    wait_for(lambda: any(m["name"] == "loss" for m in ledger.metrics(run_id)) or
             stage_states(db_url, run_id)["sft"] == "running" and _events_started(ledger, run_id),
             what="SFT to be training")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert ledger.get_run(run_id)["state"] == "interrupted"
    sft = ledger.attempts(run_id, "sft")
    assert [a["outcome"] for a in sft] == ["interrupted"]
    # The preempted stage saved a checkpoint at the step boundary, recorded and verified.
    assert ledger.checkpoints(run_id, "sft"), "a checkpoint must be saved on SIGINT"


def _events_started(ledger: Ledger, run_id: str) -> bool:
    from pathlib import Path

    run_dir = Path(ledger.get_run(run_id)["run_dir"])
    events = run_dir / ".work" / "sft" / "events-1.jsonl"
    return events.is_file() and '"step": 2' in events.read_text()
