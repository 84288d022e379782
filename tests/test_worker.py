"""The pre-imported stage worker: attempts are forked from it, the ledger says so, TRAINPIPE_WORKER=spawn
falls back to a fresh interpreter, and a SIGKILLed orchestrator takes the worker and the stage down."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import only_run_id, start_run, wait_for

import trainpipe
from trainpipe.engine.liveness import pid_alive
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def _sft_only(tmp_path: Path) -> list[str]:
    return fast_overrides(tmp_path / "out") + ["sft.max_steps=4", "stages.merge.enabled=false",
                                               "stages.dpo.enabled=false"]


def _started_events(run_dir: str, stage: str) -> list[dict]:
    events = Path(run_dir) / ".work" / stage / "events-1.jsonl"
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "started"]


def test_stage_attempt_runs_in_a_forked_worker(tmp_path: Path, db_url: str, monkeypatch) -> None:
    monkeypatch.delenv("TRAINPIPE_WORKER", raising=False)

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path))

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "fork"
    (started,) = _started_events(result.run_dir, "sft")
    # The child found the libraries already imported, and the ledger has its pid, not the worker's.
    assert started["preloaded"] is True and started["pid"] == attempt["pid"] != os.getpid()


def test_worker_spawn_env_falls_back_to_a_fresh_interpreter(tmp_path: Path, db_url: str, monkeypatch) -> None:
    monkeypatch.setenv("TRAINPIPE_WORKER", "spawn")

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path))

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "spawn"
    (started,) = _started_events(result.run_dir, "sft")
    assert started["preloaded"] is False and started["pid"] == attempt["pid"]
    assert not (Path(result.run_dir) / ".work" / "worker.log").exists(), "no pre-imported worker was started"


def test_worker_that_refuses_to_fork_falls_back_and_says_so(tmp_path: Path, db_url: str, monkeypatch) -> None:
    """What happens on a GPU box whose worker has CUDA initialised, simulated by a test hook."""
    from trainpipe.engine.runner import Observer

    notes: list[str] = []

    class Notes(Observer):
        def note(self, text: str) -> None:
            notes.append(text)

    monkeypatch.delenv("TRAINPIPE_WORKER", raising=False)
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"action": "refuse_fork"}))

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path), observer=Notes())

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "spawn"
    assert any("fresh interpreters" in n and "refused by TRAINPIPE_FAULT" in n for n in notes), notes


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def test_sigkilled_orchestrator_takes_the_worker_and_the_stage_down(tmp_path: Path, db_url: str) -> None:
    fired = tmp_path / "fired"
    fault = {"stage": "sft", "step": 2, "action": "pause", "seconds": 120, "once_file": str(fired)}
    orchestrator = start_run(QUICKSTART, fast_overrides(tmp_path / "out"), fault)
    try:
        wait_for(fired.exists, what="SFT to be mid-training")
        run_id = only_run_id(db_url)
        (attempt,) = Ledger(db_url).attempts(run_id, "sft")
        stage_pid = attempt["pid"]
        worker_pid = _parent_pid(stage_pid)
        assert attempt["worker"] == "fork"
        assert _parent_pid(worker_pid) == orchestrator.pid, "the stage's parent is the run's pre-imported worker"
        assert os.getpgid(stage_pid) == stage_pid, "the stage leads its own process group"
    finally:
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(timeout=30)

    wait_for(lambda: not pid_alive(worker_pid) and not pid_alive(stage_pid), timeout=30,
             what="the worker and the stage to die with the orchestrator")
