"""trainpipe on a real Slurm (the one-host cluster of `.ci/start-slurm`): `trainpipe submit`, the
warning signal before a time limit or a preemption (`scancel --signal=USR2 --batch`), the job's own
requeue and the requeued job continuing the run, and a two-"node" stage started with srun.

What happened is read from Slurm (`scontrol show job`: state, restarts, exit code), from the trainer's
own events and checkpoints, and from the weights; the ledger's scheduler rows are checked against
Slurm's job id and restart count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART, resume_overrides, uninterrupted_run
from helpers import (
    assert_continued_from_checkpoint,
    assert_identical,
    cli,
    final_weights,
    load_weights,
    trainer_steps,
    wait_for,
)

from test_ui import Server, _open, browser  # noqa: F401 - the headless Chromium fixture

from trainpipe import checkpoints
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o`, as a dict: JobState, Restarts, ExitCode, Reason, ..."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, timeout: float = 400, restarts: int | None = None) -> dict[str, str]:
    """Wait until Slurm has finished the job (after `restarts` requeues, if given)."""
    def finished():
        info = job_info(job_id)
        if info["JobState"] in DONE and (restarts is None or int(info["Restarts"]) >= restarts):
            return info
        return None
    return wait_for(finished, timeout=timeout, interval=0.5, what=f"Slurm job {job_id} to finish")


def submit(tmp_path: Path, overrides: list[str], *extra: str, fault: dict | None = None) -> tuple[str, str, Path]:
    env = {k: v for k, v in os.environ.items() if k != "TRAINPIPE_FAULT"}
    if fault:
        env["TRAINPIPE_FAULT"] = json.dumps(fault)
    proc = cli("submit", str(QUICKSTART), "--slurm", "--grace", "60", *_sets(overrides), *extra, "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = json.loads(proc.stdout)
    return done["job_id"], done["run_id"], Path(done["script"])


def job_log(script: Path, job_id: str) -> str:
    return (script.parent / f"slurm-{job_id}.out").read_text(encoding="utf-8", errors="replace")


def scancel_usr2(job_id: str) -> None:
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True, timeout=30)


def _rows(ledger: Ledger, run_id: str) -> tuple[int, int, int]:
    return len(ledger.transitions(run_id)), len(ledger.attempts(run_id)), len(ledger.scheduler_jobs(run_id))


def test_submitted_quickstart_runs_to_the_plain_runs_weights_and_a_resubmit_trains_nothing(
        slurm_cluster, tmp_path, db_url, reference_weights):
    job_id, run_id, script = submit(tmp_path, resume_overrides(tmp_path / "out"))
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR2@60" in text
    assert re.search(rf"^exec .* run {re.escape(str(QUICKSTART))} --run-id {run_id} ", text, re.MULTILINE)
    info = wait_job(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_log(script, job_id)
    ledger = Ledger(db_url)
    run = ledger.get_run(run_id)
    assert run["state"] == "succeeded"
    assert [(j["job_id"], j["restart_count"], j["end_reason"]) for j in ledger.scheduler_jobs(run_id)] == [
        (job_id, 0, "succeeded")]
    assert_identical(final_weights(Path(run["run_dir"])), reference_weights)

    # The same script submitted again: the run has finished, so the job reports it and trains nothing.
    before = _rows(ledger, run_id)
    again = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    second = again.stdout.strip()
    assert wait_job(second)["ExitCode"] == "0:0", job_log(script, second)
    assert "already succeeded; nothing to train" in job_log(script, second)
    assert _rows(ledger, run_id)[:2] == before[:2]  # no transition, no attempt
    ledger.close()


def _shows_the_run_waiting_in_the_queue(run_id: str, job_id: str, db_url: str, browser) -> None:
    """`status` (table and JSON) and the dashboard's runs and run pages, in a real browser."""
    [row] = [r for r in json.loads(cli("status", "--json", check=True).stdout) if r["run_id"] == run_id]
    assert row["state"] == "interrupted"
    assert (row["job"]["job_id"], row["job"]["restart_count"], row["job"]["queued"]) == (job_id, 0, True)
    assert f"waits in the slurm queue as job {job_id} (requeue 1)" in cli("status", check=True).stdout
    assert f"{job_id}" in cli("inspect", run_id, check=True).stdout
    server = Server(db_url, os.environ.copy())
    try:
        _open(browser, server.url + "/")
        note = browser.find_element("css selector", f'tr[data-run="{run_id}"] td.note').text
        assert f"waiting in the slurm queue as job {job_id}" in note
        _open(browser, f"{server.url}/runs/{run_id}")
        assert f"job {job_id} was requeued" in browser.find_element("id", "job-queued").text
        rows = browser.find_elements("css selector", "#scheduler-jobs tbody tr")
        assert [r.find_elements("css selector", "td")[1].text for r in rows] == [job_id]
        assert "preempted, requeued" in rows[0].text
    finally:
        server.stop()


def test_warning_mid_sft_checkpoints_requeues_and_the_requeued_job_resumes_bit_identical(
        slurm_cluster, tmp_path, db_url, reference_weights, browser):
    paused = tmp_path / "paused"
    job_id, run_id, script = submit(tmp_path, resume_overrides(tmp_path / "out"), fault={
        "stage": "sft", "step": 5, "action": "pause", "seconds": 3, "once_file": str(paused)})
    wait_for(paused.exists, timeout=300, what="SFT to reach step 5")
    scancel_usr2(job_id)
    # Hold the requeued job in the queue, to look at the run while it waits there.
    ledger = Ledger(db_url)
    wait_for(lambda: [j["requeued"] for j in ledger.scheduler_jobs(run_id)] == [True], timeout=120,
             what="the job to requeue itself")
    # COMPLETING while its processes end, then PENDING (Reason=BeginTime) for ~5 s before it runs again.
    wait_for(lambda: job_info(job_id)["JobState"] == "PENDING", timeout=60, interval=0.1, what="the job to pend")
    subprocess.run(["scontrol", "hold", job_id], check=True, timeout=30)
    assert job_info(job_id)["JobState"] == "PENDING"
    _shows_the_run_waiting_in_the_queue(run_id, job_id, db_url, browser)
    subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
    info = wait_job(job_id, restarts=1)
    log = job_log(script, job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
    assert f"requeued slurm job {job_id} (requeue 1 of 5)" in log

    run = ledger.get_run(run_id)
    assert run["state"] == "succeeded"
    first, second = ledger.attempts(run_id, "sft")
    assert first["outcome"] == "interrupted"
    # The first attempt's trainer saved where it stopped: its last step is the checkpoint the second began at.
    _, steps = trainer_steps(run["run_dir"], "sft", 1)
    assert second["resumed_from"].endswith(f"checkpoint-{steps[-1]}")
    assert_continued_from_checkpoint(ledger, run_id, "sft")  # began there, first step = checkpoint + 1
    assert second["metrics"]["data"]["sft"]["action"] == "reused"  # not tokenized again
    interrupt = next(t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt")
    assert interrupt["detail"]["reason"] == "preempted"
    assert [(j["job_id"], j["restart_count"], j["end_reason"], j["requeued"])
            for j in ledger.scheduler_jobs(run_id)] == [(job_id, 0, "preempted", True),
                                                        (job_id, 1, "succeeded", False)]
    assert_identical(final_weights(Path(run["run_dir"])), reference_weights)
    ledger.close()


@pytest.mark.parametrize("where", [{"stage": "merge", "at": "start"}, {"stage": "dpo", "at": "gate"}],
                         ids=["merge", "dpo-gate"])
def test_warning_where_no_step_runs_stops_at_once_and_the_requeued_job_finishes_the_run(
        slurm_cluster, tmp_path, db_url, reference_weights, where):
    """In the merge and in a gate there is no step boundary to wait for: the attempt stops at once
    (it was paused for 10 minutes there), the job requeues, and the run ends on the same weights."""
    paused = tmp_path / "paused"
    job_id, run_id, script = submit(tmp_path, resume_overrides(tmp_path / "out"), fault={
        **where, "action": "pause", "seconds": 600, "once_file": str(paused)})
    wait_for(paused.exists, timeout=300, what=f"{where['stage']} to reach {where['at']}")
    signalled = time.time()
    scancel_usr2(job_id)
    info = wait_job(job_id, restarts=1)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), job_log(script, job_id)
    ledger = Ledger(db_url)
    stopped = ledger.attempts(run_id, where["stage"])[0]
    assert stopped["outcome"] == "interrupted"
    assert "outside a training step" in stopped["error"]
    assert stopped["finished_at"] - signalled < 300  # not the pause's 600 s: it did not wait
    assert ledger.get_run(run_id)["state"] == "succeeded"
    assert_identical(final_weights(Path(ledger.get_run(run_id)["run_dir"])), reference_weights)
    ledger.close()


def test_no_requeues_left_leaves_the_run_interrupted_with_how_to_continue(slurm_cluster, tmp_path, db_url):
    paused = tmp_path / "paused"
    job_id, run_id, script = submit(tmp_path, resume_overrides(tmp_path / "out"), "--max-requeues", "0", fault={
        "stage": "sft", "step": 5, "action": "pause", "seconds": 3, "once_file": str(paused)})
    wait_for(paused.exists, timeout=300, what="SFT to reach step 5")
    scancel_usr2(job_id)
    info = wait_job(job_id)
    time.sleep(2)  # a requeue, had there been one, would show as Restarts=1 by now
    info = job_info(job_id)
    log = job_log(script, job_id)
    assert info["Restarts"] == "0" and info["JobState"] in DONE, log
    assert "used its 0 requeue(s)" in log and f"trainpipe resume {run_id}" in log
    ledger = Ledger(db_url)
    assert ledger.get_run(run_id)["state"] == "interrupted"
    assert [(j["end_reason"], j["requeued"]) for j in ledger.scheduler_jobs(run_id)] == [("preempted", False)]
    ledger.close()


def test_a_second_submission_of_the_same_script_while_the_first_runs_is_refused(slurm_cluster, tmp_path, db_url):
    paused = tmp_path / "paused"
    job_id, run_id, script = submit(tmp_path, resume_overrides(tmp_path / "out"), fault={
        "stage": "sft", "at": "start", "action": "pause", "seconds": 600, "once_file": str(paused)})
    try:
        wait_for(paused.exists, timeout=300, what="the first job's SFT to start")
        ledger = Ledger(db_url)
        before = _rows(ledger, run_id)
        second = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                                check=True).stdout.strip()
        info = wait_job(second)
        log = job_log(script, second)
        assert info["ExitCode"] == "2:0", log
        assert f"run {run_id} is owned by pid" in log and f"slurm job {job_id}" in log
        assert _rows(ledger, run_id) == before
        assert ledger.get_run(run_id)["state"] == "running"
        ledger.close()
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
        wait_job(job_id)


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, model_cache):
    """SFT on two ranks of one torchrun, uninterrupted: the adapter a two-node run must equal."""
    from test_ddp import ddp_overrides

    run_dir = uninterrupted_run(tmp_path_factory, model_cache, "two-rank-reference", ddp_overrides)
    return load_weights(run_dir / "sft" / "adapter_model.safetensors")


def test_a_two_node_stage_is_started_on_every_task_by_srun(slurm_cluster, tmp_path, db_url, two_rank_reference):
    """A user's own batch script with `trainpipe run CONFIG` in an allocation of 2 tasks, each standing
    for a node: the stage's torchrun runs once per task (node rank = SLURM_PROCID), meeting on the
    allocation's first host, and trains the adapter two ranks on one node train. Nobody types join."""
    from test_ddp import assert_same_adapter, ddp_overrides

    overrides = [o for o in ddp_overrides(tmp_path / "out") if not o.startswith("sft.launcher.nproc_per_node")]
    overrides += ["sft.launcher.nproc_per_node=1", "sft.launcher.nnodes=2"]
    script = tmp_path / "job.sbatch"
    command = " ".join([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *_sets(overrides)])
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output={tmp_path}/slurm-%j.out\n"
                      f"exec {command}\n")
    # torchrun sets OMP_NUM_THREADS=1 only for nproc_per_node > 1; the reference's ranks ran with one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job_id = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                            env=env).stdout.strip()
    info = wait_job(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["ExitCode"] == "0:0", log
    ledger = Ledger(db_url)
    run_id = f"quickstart-slurm-{job_id}"  # the default run id inside a Slurm job
    [attempt] = ledger.attempts(run_id, "sft")
    # torchrun's own count of the nodes that met (GROUP_WORLD_SIZE), as the ranks saw it: two torchruns
    # of one rank each, not one torchrun of two.
    assert attempt["worker"] == "torchrun" and attempt["metrics"]["world_size"] == 2
    assert attempt["metrics"]["torchrun_nodes"] == 2, attempt["metrics"]
    manifest = json.loads((Path(ledger.checkpoints(run_id, "sft")[-1]["path"]) / checkpoints.MANIFEST).read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])
    assert_same_adapter(two_rank_reference, load_weights(Path(ledger.get_run(run_id)["run_dir"]) / "sft" /
                                                         "adapter_model.safetensors"))
    ledger.close()
