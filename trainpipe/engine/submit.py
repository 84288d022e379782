"""`trainpipe submit CONFIG --slurm`: write a batch script for the run and hand it to `sbatch`.

The script asks Slurm for a warning before the time limit or a preemption (`--signal=B:USR2@GRACE`)
and for requeueing (`--requeue`), and `exec`s `trainpipe run CONFIG --run-id ID`: exec, because with
`B:` only the batch shell gets the signal, and bash runs a trap only after its foreground child
exits. On the warning the run stops at a checkpoint and the job requeues itself; the requeued job
runs the same line and continues the run (engine/rerun.py, engine/scheduler.py). Slurm itself
starts one task per node and places the job; trainpipe adds no coordinator of its own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from trainpipe.errors import PreflightError, TrainpipeError

# Seconds of warning before the time limit or a preemption: enough to reach the next step boundary
# and write a checkpoint of a large model on a slow shared file system.
DEFAULT_GRACE_S = 300
# File systems on which SQLite's locking cannot be trusted by jobs on several nodes.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "fuse.ceph",
                       "glusterfs", "fuse.glusterfs", "panfs", "9p")


@dataclass
class SlurmRequest:
    nodes: int = 1
    gpus_per_node: int | None = None
    time: str | None = None            # HH:MM:SS, or any form sbatch's --time takes
    partition: str | None = None
    account: str | None = None
    max_requeues: int | None = None
    grace_s: int = DEFAULT_GRACE_S
    job_name: str | None = None


@dataclass
class Submission:
    run_id: str
    script: str
    script_path: str
    job_id: str | None     # None for --dry-run


def run_command(config_path: Path, run_id: str, *, overrides: list[str], sft_dataset: str | None,
                preference_dataset: str | None, db_url: str | None, max_requeues: int | None) -> list[str]:
    """The `trainpipe run` line the job executes: the same on every requeue."""
    entry = Path(sys.executable).with_name("trainpipe")
    command = [str(entry)] if entry.is_file() else [sys.executable, "-m", "trainpipe.cli.app"]
    command += ["run", str(config_path), "--run-id", run_id]
    for item in overrides:
        command += ["--set", item]
    if sft_dataset:
        command += ["--sft-dataset", sft_dataset]
    if preference_dataset:
        command += ["--preference-dataset", preference_dataset]
    if max_requeues is not None:
        command += ["--max-requeues", str(max_requeues)]
    if db_url:
        command += ["--db", db_url]
    return command


def sbatch_script(command: list[str], request: SlurmRequest, *, log_dir: Path, workdir: Path) -> str:
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={request.job_name or 'trainpipe'}",
             f"#SBATCH --output={log_dir}/slurm-%j.out",
             "#SBATCH --open-mode=append",
             # Requeue on the warning (engine/scheduler.py) and on Slurm's own preemption/node failure.
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR2@{request.grace_s}",
             f"#SBATCH --nodes={request.nodes}",
             # One task per node: the batch step runs trainpipe on the first node; a multi-node stage's
             # torchrun is started on every node with srun (engine/stage_process.py).
             "#SBATCH --ntasks-per-node=1"]
    if request.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={request.gpus_per_node}")
    if request.time:
        lines.append(f"#SBATCH --time={request.time}")
    if request.partition:
        lines.append(f"#SBATCH --partition={request.partition}")
    if request.account:
        lines.append(f"#SBATCH --account={request.account}")
    lines += ["",
              "# Written by `trainpipe submit`. Submitting this script again continues the same run: a",
              "# finished run is reported, an interrupted one resumed, one still running is left alone.",
              "# exec: with --signal=B:USR2 only this shell gets the warning, and bash would run a trap only",
              "# after its foreground child exits; trainpipe itself must receive it.",
              f"cd {shlex.quote(str(workdir))}",
              "exec " + " ".join(shlex.quote(part) for part in command), ""]
    return "\n".join(lines)


def filesystem_type(path: Path) -> str | None:
    """The type of the mounted file system `path` is on (Linux /proc/mounts), or None."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, best_type = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (str(target) == point or str(target).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, parts[2]
    return best_type


def sqlite_on_network_fs(db_url: str) -> str | None:
    """Why this ledger is unsafe for jobs on several nodes, or None."""
    from trainpipe.store.reader import sqlite_file

    file = sqlite_file(db_url)
    if file is None:
        return None
    fstype = filesystem_type(file.parent)
    if fstype and fstype.lower() in NETWORK_FILESYSTEMS:
        return f"the ledger {file} is an SQLite file on {fstype}, where SQLite's file locking is unreliable"
    return None


def submit(config_path: str, *, request: SlurmRequest, overrides: list[str] | None = None,
           sft_dataset: str | None = None, preference_dataset: str | None = None, db_url: str | None = None,
           dry_run: bool = False, force: bool = False, note=print) -> Submission:
    """Validate the config and data (bad input raises before anything is written), write the batch
    script into the run's directory and submit it; `dry_run` writes and submits nothing."""
    from trainpipe.config import load_config
    from trainpipe.engine import driver, preflight
    from trainpipe.engine.observer import Observer
    from trainpipe.paths import inside
    from trainpipe.store.reader import default_db_url

    if request.nodes < 1:
        raise TrainpipeError(f"--nodes must be 1 or more, got {request.nodes}")
    if request.max_requeues is not None and request.max_requeues < 0:
        raise TrainpipeError(f"--max-requeues must be 0 or more, got {request.max_requeues}")
    config = load_config(config_path, overrides=overrides, sft_dataset=sft_dataset,
                         preference_dataset=preference_dataset)
    preflight.validate_inputs(config, Observer())
    url = db_url or default_db_url()
    unsafe = sqlite_on_network_fs(url)
    if unsafe and not force:
        raise PreflightError(f"{unsafe}: jobs on different nodes would share it",
                             hint="use a PostgreSQL ledger (--db postgresql+psycopg://USER@HOST/DB; see "
                                  "docs/shared-ledger.md), or --force to submit anyway")
    if unsafe:
        note(f"warning: {unsafe}")
    if not dry_run and shutil.which("sbatch") is None:
        raise PreflightError("sbatch is not on PATH: `trainpipe submit --slurm` runs on a Slurm login node",
                             hint="or put `trainpipe run CONFIG` in your own batch script (docs/clusters.md)")
    run_id = driver.new_run_id(config.pipeline_id)
    run_dir = inside(config.output_dir, run_id)
    log_dir = run_dir / "slurm"
    command = run_command(Path(config_path).resolve(), run_id, overrides=list(overrides or []),
                          sft_dataset=sft_dataset, preference_dataset=preference_dataset,
                          db_url=url, max_requeues=request.max_requeues)
    request.job_name = request.job_name or f"trainpipe-{config.pipeline_id}"[:64]
    script = sbatch_script(command, request, log_dir=log_dir, workdir=Path.cwd())
    script_path = log_dir / "job.sbatch"
    if dry_run:
        return Submission(run_id, script, str(script_path), None)
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script, encoding="utf-8")
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True,
                          env={**os.environ})
    if proc.returncode != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise TrainpipeError(f"sbatch refused the job: {(proc.stderr or proc.stdout).strip()}",
                             hint=f"the script was: {script_path}")
    job_id = proc.stdout.strip().split(";")[0]
    return Submission(run_id, script, str(script_path), job_id)
