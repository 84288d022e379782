"""The same command, executed again, continues its run (`trainpipe run CONFIG --run-id ID`): what a
requeued Slurm job, a restarted Kubernetes pod or a recovered SkyPilot job does. Real processes, real
signals, a real SQLite ledger; the scheduler's part is its environment (the real Slurm is in
tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, REPO_ROOT, resume_overrides
from helpers import assert_continued_from_checkpoint, assert_identical, cli, final_weights, trainer_steps, wait_for

from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TRAINPIPE_FAULT"))}
    env.update(extra)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def _ledger_rows(db_url: str, run_id: str) -> tuple[int, int, int]:
    ledger = Ledger(db_url)
    try:
        return (len(ledger.transitions(run_id)), len(ledger.attempts(run_id)), len(ledger.scheduler_jobs(run_id)))
    finally:
        ledger.close()


def _checkpoint_recorded(db_url: str, run_id: str, stage: str, step: int) -> bool:
    ledger = Ledger(db_url)
    try:
        return ledger.find_run(run_id) is not None and any(c["step"] >= step for c in ledger.checkpoints(run_id, stage))
    finally:
        ledger.close()


def test_the_same_command_reports_a_finished_run_and_refuses_another_config(tmp_path, db_url):
    overrides = resume_overrides(tmp_path / "out")
    first = cli("run", str(QUICKSTART), *_sets(overrides), "--run-id", "same-cmd", env=_env())
    assert first.returncode == 0, first.stderr
    before = _ledger_rows(db_url, "same-cmd")

    again = cli("run", str(QUICKSTART), *_sets(overrides), "--run-id", "same-cmd", env=_env())
    assert again.returncode == 0, again.stderr
    assert "already succeeded" in again.stdout
    assert _ledger_rows(db_url, "same-cmd") == before  # no attempt, no transition: nothing trained

    other = cli("run", str(QUICKSTART), *_sets(overrides + ["sft.learning_rate=1e-3"]), "--run-id", "same-cmd",
                env=_env())
    assert other.returncode == 2
    assert "sft.learning_rate" in other.stderr and "Traceback" not in other.stderr
    assert _ledger_rows(db_url, "same-cmd") == before


EXAMPLES = REPO_ROOT / "examples" / "cluster"


def example_command(name: str, out: Path) -> tuple[str, dict[str, str]]:
    """The shell command an example runs, as its system would run it, and the environment that system
    sets: the PyTorchJob's container command (the training operator's PET_*/MASTER_* variables), the
    SkyPilot task's `run:` (its `envs:` and SKYPILOT_* variables). The mounted run dir is `out`."""
    spec = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    if name == "pytorchjob.yaml":
        [container] = spec["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["bash", "-c"]
        command = container["command"][2]
        env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "23456", "WORLD_SIZE": "1", "RANK": "0"}
    else:
        command = spec["run"].strip()
        env = {**{k: str(v) for k, v in spec["envs"].items()}, "SKYPILOT_NODE_RANK": "0",
               "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NUM_GPUS_PER_NODE": "0"}
    assert " --run-id " in command and command.startswith("exec trainpipe run configs/quickstart.yaml")
    return command.replace("/runs", str(out)), env


@pytest.mark.parametrize("how", ["slurm_warning", "pytorchjob.yaml", "skypilot.yaml"])
def test_a_stop_signal_then_the_same_command_continues_bit_identical(tmp_path, db_url, reference_weights, how):
    """Slurm's warning (SIGUSR2, `--signal=B:USR2@GRACE`), or the SIGTERM of a pod eviction or a spot
    VM's shutdown running the shipped Kubernetes and SkyPilot examples, mid-SFT: the stage saves at
    the step boundary, the run stops `interrupted`, and the same command, run again as the system
    reruns it, continues from that checkpoint with no step trained twice."""
    overrides = resume_overrides(tmp_path / "out")
    # Holds step 5 for a moment (once), so that the signal arrives while SFT is training.
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 3, "once_file": str(tmp_path / "paused")}
    if how == "slurm_warning":
        env, sig, reason = _env(SLURM_JOB_ID="31337", SLURM_JOB_NODELIST="node1"), signal.SIGUSR2, "preempted"
        run_id = "quickstart-slurm-31337"  # the default id inside a Slurm job
        argv = [sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *_sets(overrides),
                "--max-requeues", "0"]  # no scontrol here: tests/test_slurm.py requeues
    else:
        # The example's command in a copy of the repo's layout (configs/, examples/task_api/), with the
        # test's short settings appended; `trainpipe` on PATH as in the image.
        work = tmp_path / "work"
        shutil.copytree(REPO_ROOT / "configs", work / "configs")
        shutil.copytree(REPO_ROOT / "examples" / "task_api", work / "examples" / "task_api")
        command, system_env = example_command(how, tmp_path / "out")
        command += " " + " ".join(f"--set {o}" for o in overrides if not o.startswith("output_dir="))
        run_id = re.search(r"--run-id (\S+)", command).group(1)
        run_id = system_env.get(run_id.strip("${}"), run_id)
        env = _env(**system_env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        argv = ["bash", "-c", f"cd {work} && {command}"]
        sig, reason = signal.SIGTERM, "terminated"
    with (tmp_path / "first.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, "TRAINPIPE_FAULT": json.dumps(fault)})
    wait_for(lambda: (tmp_path / "paused").exists() or proc.poll() is not None, timeout=300, what="SFT at step 5")
    proc.send_signal(sig)  # `exec`: the signal reaches trainpipe itself, as the system sends it to PID 1
    assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()

    ledger = Ledger(db_url)
    run = ledger.get_run(run_id)
    assert run["state"] == "interrupted"
    interrupt = [t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt"][-1]
    assert interrupt["detail"]["reason"] == reason
    # The trainer stopped at a step boundary and saved there: its last finished step is the newest checkpoint.
    _, finished = trainer_steps(run["run_dir"], "sft", 1)
    newest = max(c["step"] for c in ledger.checkpoints(run_id, "sft"))
    assert finished[-1] == newest and 5 <= newest < 12, (finished, newest)
    if how == "slurm_warning":
        jobs = ledger.scheduler_jobs(run_id)
        assert [(j["job_id"], j["restart_count"], j["end_reason"], j["requeued"]) for j in jobs] == [
            ("31337", 0, "preempted", False)]
        assert "used its 0 requeue(s)" in (tmp_path / "first.log").read_text()

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_continued_from_checkpoint(ledger, run_id, "sft")
    assert ledger.attempts(run_id, "sft")[-1]["resumed_from"].endswith(f"checkpoint-{newest}")
    assert_identical(final_weights(Path(run["run_dir"])), reference_weights)
    ledger.close()


def _stop_outside_a_write(pid: int, db_file: Path) -> None:
    """SIGSTOP the process, at a moment when it holds no write lock on the ledger (it writes a
    heartbeat every 2 s): a stopped owner must look alive, not block the ledger."""
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        try:
            conn = sqlite3.connect(db_file, timeout=0.5)
            conn.execute("BEGIN IMMEDIATE")
            conn.rollback()
            conn.close()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
    raise AssertionError("the owner kept the ledger locked")


def test_a_requeued_job_takes_its_run_over_at_once_and_another_job_is_refused(tmp_path, db_url, reference_weights):
    """Slurm starts a requeued job only after its previous execution ended, so the run that execution
    owned is taken over at once by the next one (SLURM_RESTART_COUNT + 1), although its owner still
    looks alive (here: stopped, with its pid in place and a fresh heartbeat). A different job under
    the same run id is refused, and the ledger left as it was."""
    overrides = resume_overrides(tmp_path / "out")
    run_id = "quickstart-slurm-4242"
    fault = {"stage": "sft", "step": 5, "action": "pause", "seconds": 600, "once_file": str(tmp_path / "paused")}
    job = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_RESTART_COUNT="0")
    first = _start(_sets(overrides), {**_env(**job), "TRAINPIPE_FAULT": json.dumps(fault)},
                   tmp_path / "first.log")
    try:
        wait_for(lambda: (tmp_path / "paused").exists() or first.poll() is not None, timeout=300,
                 what="SFT at step 5")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        ledger = Ledger(db_url)
        stage_pid = ledger.attempts(run_id, "sft")[-1]["pid"]
        _stop_outside_a_write(first.pid, Path(db_url.removeprefix("sqlite:///")))
        os.kill(stage_pid, signal.SIGKILL)  # the stopped owner's training is gone, as with a lost node
        assert ledger.get_run(run_id)["state"] == "running"
        before = _ledger_rows(db_url, run_id)

        other = cli("run", str(QUICKSTART), *_sets(overrides), "--run-id", run_id,
                    env=_env(SLURM_JOB_ID="5555", SLURM_RESTART_COUNT="0"))
        assert other.returncode == 2, other.stdout + other.stderr
        assert f"pid {first.pid}" in other.stderr and "job 4242" in other.stderr
        assert _ledger_rows(db_url, run_id) == before

        requeued = cli("run", str(QUICKSTART), *_sets(overrides), env=_env(**{**job, "SLURM_RESTART_COUNT": "1"}),
                       timeout=300)
        assert requeued.returncode == 0, requeued.stdout + requeued.stderr
        interrupt = next(t for t in ledger.transitions(run_id) if t["trigger"] == "interrupt")
        assert "requeued (restart 1)" in interrupt["detail"]["reason"]
        jobs = ledger.scheduler_jobs(run_id)
        assert [(j["restart_count"], j["end_reason"]) for j in jobs] == [(0, "lost"), (1, "succeeded")]
        assert_continued_from_checkpoint(ledger, run_id, "sft")
        assert_identical(final_weights(Path(ledger.get_run(run_id)["run_dir"])), reference_weights)
        ledger.close()
    finally:
        first.kill()
        os.kill(first.pid, signal.SIGCONT) if first.poll() is None else None
        first.wait(timeout=60)
