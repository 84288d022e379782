"""Retries, OOM recovery and timeouts, driven by the TRAINPIPE_FAULT hook (real OOM and real hangs
cannot be provoked reliably here; the hook raises torch.OutOfMemoryError or sleeps inside a real
training step)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import cli

import trainpipe
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def test_oom_retry_halves_micro_batch_keeps_effective_batch(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps(
        {"stage": "sft", "step": 3, "action": "oom", "once_file": str(tmp_path / "fired")}))
    result = trainpipe.run(QUICKSTART, overrides=fast_overrides(tmp_path / "out") + ["stages.dpo.enabled=false"])
    assert result.state == "succeeded", result.errors
    ledger = Ledger(db_url)
    first, second = ledger.attempts(result.run_id, "sft")
    assert first["outcome"] == "failed" and "OutOfMemoryError" in first["error"]
    assert first["overrides"] == {}
    # quickstart: batch 8 x accumulation 1 -> retry with 4 x 2, the same effective batch of 8
    assert second["overrides"] == {"batch_size": 4, "gradient_accumulation": 2}
    assert second["outcome"] == "passed"
    # What the retry's trainer used, from its own records in the checkpoints it wrote (OOM struck at
    # step 3, before the first checkpoint, so every checkpoint is the retry's): its TrainingArguments
    # and its TrainerState.
    import torch

    saved = [c for c in ledger.checkpoints(result.run_id, "sft") if c["attempt_id"] == second["id"]]
    assert saved, "the retry wrote no checkpoint"
    for checkpoint in saved:
        with warnings.catch_warnings():  # unpickling the arguments imports torch.jit, which warns of itself
            warnings.simplefilter("ignore", DeprecationWarning)
            args = torch.load(Path(checkpoint["path"]) / "training_args.bin", weights_only=False)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2), checkpoint["path"]
        state = json.loads((Path(checkpoint["path"]) / "trainer_state.json").read_text(encoding="utf-8"))
        assert state["train_batch_size"] == 4, checkpoint["path"]
    report = json.loads(cli("inspect", result.run_id, "--json", check=True).stdout)
    sft = next(s for s in report["stages"] if s["name"] == "sft")
    assert sft["attempts"] == 2
    assert sft["attempt_history"][1]["overrides"] == {"batch_size": 4, "gradient_accumulation": 2}


def test_stage_timeout_kills_process_group_and_fails_run(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("TRAINPIPE_TERM_GRACE_S", "2")
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"stage": "sft", "step": 2, "action": "pause", "seconds": 300}))
    # 0.25 minutes: enough to load the tiny model and reach step 2, far less than the 300 s pause.
    proc = cli("run", str(QUICKSTART), *[a for o in fast_overrides(tmp_path / "out") + [
        "stages.sft.timeout_minutes=0.25", "stages.sft.retry_count=0"] for a in ("--set", o)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ledger = Ledger(db_url)
    run = ledger.list_runs()[0]
    assert run["state"] == "failed"
    attempt = ledger.attempts(run["run_id"], "sft")[0]
    assert attempt["outcome"] == "timed_out" and "timed out after 15 s" in attempt["error"]
    from trainpipe.engine.liveness import pid_alive

    assert not pid_alive(attempt["pid"]), "the stage process group must be gone"
    # A failed run is resumable.
    assert "trainpipe resume" in proc.stdout


@pytest.mark.extended  # CI's budget: `make matrix` runs it; test_concurrency shows the exclusive claim
def test_second_resume_refuses_while_owner_alive(tmp_path, db_url):
    import signal

    from helpers import only_run_id, start_run, wait_for

    fired = tmp_path / "fired"
    fault = {"stage": "sft", "step": 2, "action": "pause", "seconds": 120, "once_file": str(fired)}
    owner = start_run(QUICKSTART, fast_overrides(tmp_path / "out"), fault)
    try:
        wait_for(fired.exists, what="SFT to be mid-training")
        run_id = only_run_id(db_url)
        second = cli("resume", run_id)
        assert second.returncode == 2
        assert f"run {run_id} is owned by pid {owner.pid} on host" in second.stderr
        assert Ledger(db_url).get_run(run_id)["state"] == "running"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
    # The killed owner's lock never blocks a later resume.
    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


def test_transient_failures_are_retried_after_5_then_10_seconds(tmp_path, db_url, monkeypatch):
    """The retry backoff, on a fake clock: the orchestrator's sleeps are recorded, not slept. Every SFT
    attempt is SIGKILLed as it starts (a transient failure), so all retries are spent."""
    import time
    import types

    from trainpipe.engine import stage_attempt

    ledger = Ledger(db_url)
    slept: list[tuple[float, list[str]]] = []

    def fake_sleep(seconds: float) -> None:
        # What the ledger held when the orchestrator went to sleep: which attempts had ended.
        run_id = ledger.list_runs(limit=None)[0]["run_id"]
        slept.append((seconds, [a["outcome"] for a in ledger.attempts(run_id, "sft")]))

    monkeypatch.setattr(stage_attempt, "time", types.SimpleNamespace(time=time.time, strftime=time.strftime,
                                                                     sleep=fake_sleep))
    monkeypatch.setattr(stage_attempt, "RETRY_BACKOFF_S", 5.0)
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"stage": "sft", "at": "start", "action": "sigkill"}))

    result = trainpipe.run(QUICKSTART, overrides=fast_overrides(tmp_path / "out") + [
        "stages.sft.retry_count=3", "stages.merge.enabled=false", "stages.dpo.enabled=false"])

    assert result.state == "failed"
    attempts = ledger.attempts(result.run_id, "sft")
    assert [a["outcome"] for a in attempts] == ["failed"] * 4
    assert all("SIGKILL" in a["error"] for a in attempts), [a["error"] for a in attempts]
    # Doubling from TRAINPIPE_RETRY_BACKOFF_S, one sleep between each two attempts and none after the last.
    assert slept == [(5.0, ["failed"]), (10.0, ["failed"] * 2), (20.0, ["failed"] * 3)]
