"""A run whose owner is on another host: no pid to look up, only its heartbeat in the shared ledger.
This is what a PostgreSQL ledger shared by several machines, and multi-node runs, rely on."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import assert_continued_from_checkpoint, cli, cli_json, only_run_id, start_run

from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow

OTHER_HOST = "gpu-node-7.elsewhere"
OTHER_PID = 4242  # on that host; whether some process here has this pid must not matter
STALE_AFTER_S = 30


def _owner_elsewhere(db_url: str, run_id: str, heartbeat_age_s: float) -> None:
    """Make the ledger say what it would if the run's owner were on another machine, its last heartbeat
    `heartbeat_age_s` ago: the row another host's `trainpipe run` writes, set here with plain SQL."""
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        with conn:
            conn.execute("UPDATE runs SET owner_pid = ?, owner_host = ?, heartbeat_at = ? WHERE run_id = ?",
                         (OTHER_PID, OTHER_HOST, time.time() - heartbeat_age_s, run_id))
    finally:
        conn.close()


def test_a_stale_heartbeat_from_another_host_marks_the_run_interrupted_and_resume_claims_it(tmp_path, db_url):
    # A real run, SIGKILLed (orchestrator and stage) after SFT's checkpoint 4: the ledger says
    # `running`, its SFT attempt open, checkpoints recorded.
    overrides = fast_overrides(tmp_path / "out") + ["stages.merge.enabled=false", "stages.dpo.enabled=false"]
    proc = start_run(QUICKSTART, overrides, fault={"action": "kill_orchestrator", "at": "sft:checkpoint", "step": 4,
                                                   "once_file": str(tmp_path / "fired")})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    run_id = only_run_id(db_url)
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "running"
    env = {**os.environ, "TRAINPIPE_STALE_AFTER_S": str(STALE_AFTER_S)}

    # 1. Owned by a process on another host that beat 5 s ago: nothing here can tell it is gone, so
    #    `status` leaves it running and `resume` is refused, naming the owner.
    _owner_elsewhere(db_url, run_id, heartbeat_age_s=5)
    rows = cli_json("status", "--db", db_url)
    assert [(r["run_id"], r["state"]) for r in rows] == [(run_id, "running")]
    refused = cli("resume", run_id, env=env)
    assert refused.returncode == 2 and f"owned by pid {OTHER_PID} on host {OTHER_HOST}" in refused.stderr, (
        refused.stdout + refused.stderr)
    assert ledger.get_run(run_id)["state"] == "running"

    # 2. Its last heartbeat is older than TRAINPIPE_STALE_AFTER_S: `status` marks it interrupted, once,
    #    saying why, and closes its open attempt.
    _owner_elsewhere(db_url, run_id, heartbeat_age_s=STALE_AFTER_S + 30)
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    run = ledger.get_run(run_id)
    assert run["state"] == "interrupted" and run["owner_pid"] is None and run["owner_host"] is None
    (interrupt,) = [t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt" and t["stage"] is None]
    assert f"no heartbeat from pid {OTHER_PID} on {OTHER_HOST}" in interrupt["detail"]["reason"]
    assert [a["outcome"] for a in ledger.attempts(run_id, "sft")] == ["interrupted"]

    # 3. `resume` here claims it (this host becomes the owner) and SFT goes on from its checkpoint.
    resumed = cli("resume", run_id, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    claims = [t for t in ledger.transitions(run_id) if t["trigger"] == "resume" and t["stage"] is None]
    assert len(claims) == 1 and claims[0]["host"] != OTHER_HOST
    assert ledger.get_run(run_id)["state"] == "succeeded"
    assert [a["outcome"] for a in ledger.attempts(run_id, "sft")] == ["interrupted", "passed"]
    assert assert_continued_from_checkpoint(ledger, run_id, "sft") >= 4
    assert Path(ledger.get_run(run_id)["run_dir"], "sft", "adapter_model.safetensors").is_file()
