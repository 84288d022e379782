"""The batch scheduler that started this process, if any (Slurm), and what trainpipe asks of it.

A requeued Slurm job, a restarted Kubernetes pod and a recovered SkyPilot managed job all re-execute
the same command. So `trainpipe run CONFIG` inside a Slurm job takes its run id from the job
(`<pipeline>-slurm-<job id>`), and the second execution continues the run the first one started.
Slurm numbers the executions of one job (SLURM_RESTART_COUNT), and only starts a requeued job once
its previous execution has ended: a run owned by an earlier execution of this very job is known to
be abandoned, and is taken over without waiting for its heartbeat to go stale.

On the warning signal (`#SBATCH --signal=B:USR2@GRACE`, engine/stop.py) the run stops `interrupted`
at a checkpoint, and the job asks Slurm to requeue it (`scontrol requeue`) unless the run finished
or its requeues are used up. Neither torch nor rich is imported here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Requeues a job asks for on its own before it leaves the run interrupted for a person. Slurm's own
# cap (slurm.conf MaxBatchRequeue) is 5 by default too; `--max-requeues` / TRAINPIPE_MAX_REQUEUES.
DEFAULT_MAX_REQUEUES = 5
MAX_REQUEUES_ENV = "TRAINPIPE_MAX_REQUEUES"


@dataclass(frozen=True)
class Job:
    scheduler: str        # "slurm"
    job_id: str           # as the user sees it: "123", or "120_4" for task 4 of array job 120
    restart_count: int    # 0 for the first execution, +1 for each requeue
    nodes: str | None     # the allocation's node list, in the scheduler's notation
    raw_id: str           # what `scontrol requeue` takes: SLURM_JOB_ID (an array task has its own)

    def describe(self) -> str:
        restarts = f", restart {self.restart_count}" if self.restart_count else ""
        return f"{self.scheduler} job {self.job_id}{restarts}"


def current_job(env: Mapping[str, str] = os.environ) -> Job | None:
    """The Slurm job this process runs in (a batch job, or a step of one), else None."""
    raw = env.get("SLURM_JOB_ID")
    if not raw:
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else raw
    return Job("slurm", job_id, _int(env.get("SLURM_RESTART_COUNT")), env.get("SLURM_JOB_NODELIST"), raw)


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def default_run_id(pipeline_id: str, job: Job | None) -> str | None:
    """The run id a scheduler's job implies, so that its requeue continues the same run."""
    if job is None:
        return None
    return f"{pipeline_id}-{job.scheduler}-{job.job_id}"


def superseded_owner(run: dict[str, Any], jobs: list[dict[str, Any]], job: Job | None) -> str | None:
    """Why the run's recorded owner is certainly dead although it may look alive, or None.

    - An earlier execution of this same scheduler job owned it: Slurm starts a requeued job only after
      the previous execution ended (its processes killed), so no heartbeat needs to go stale.
    - The owner's pid is this process's own on this host: a restarted container (Kubernetes restarts
      the same command in a new pid namespace, where pid 1 or 7 comes round again)."""
    from trainpipe.store.reader import HOST

    if run.get("owner_pid") == os.getpid() and run.get("owner_host") == HOST:
        return f"owner pid {os.getpid()} on {HOST} is this process: an earlier execution of the same command"
    if job is None or not jobs:
        return None
    last = jobs[-1]
    if (last["scheduler"] == job.scheduler and last["job_id"] == job.job_id and last["ended_at"] is None
            and int(last["restart_count"]) < job.restart_count):
        return (f"{job.scheduler} job {job.job_id} was requeued (restart {job.restart_count}): its execution "
                f"{last['restart_count']} on {last['host']} has ended")
    return None


def max_requeues(option: int | None, env: Mapping[str, str] = os.environ) -> int:
    if option is not None:
        return option
    return _int(env.get(MAX_REQUEUES_ENV), DEFAULT_MAX_REQUEUES)


def requeue(job: Job) -> str | None:
    """Ask the scheduler to requeue this job; None on success, else why not. Slurm ends the job's
    processes (this one too) and starts the same batch script again later."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "scontrol is not on PATH"
    # The run is recorded and over; the SIGTERM that the requeue sends this job must not cut the
    # summary short (Slurm SIGKILLs after KillWait anyway).
    previous = _ignore_sigterm()
    try:
        proc = subprocess.run([scontrol, "requeue", job.raw_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _restore_sigterm(previous)
        return f"scontrol requeue {job.raw_id}: {exc}"
    if proc.returncode != 0:
        _restore_sigterm(previous)
        return f"scontrol requeue {job.raw_id} failed: {(proc.stderr or proc.stdout).strip()}"
    return None


def _ignore_sigterm() -> Any:
    try:
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
