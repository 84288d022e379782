"""What `submit`, `status` and `inspect` show of the scheduler (Slurm): the submitted job, the job a
run is running or waiting as, and each job that ran the run's command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from trainpipe import humanize

if TYPE_CHECKING:
    from rich.console import Console

    from trainpipe.cli.render import Renderer


def job_status_line(row: dict[str, Any]) -> str | None:
    """The line under `status`'s table for a run that a scheduler job runs or will run again."""
    job, run_id = row.get("job"), escape(row["run_id"])
    if not job:
        return None
    if job["queued"]:
        return (f"[yellow]{run_id}[/] is interrupted and waits in the {job['scheduler']} queue as job "
                f"{escape(job['job_id'])} (requeue {job['restart_count'] + 1}); it resumes when the job starts again")
    if row["state"] == "running":
        restart = f" (restart {job['restart_count']})" if job["restart_count"] else ""
        return f"{run_id} runs as {job['scheduler']} job {escape(job['job_id'])}{restart}"
    return None


def submission(renderer: Renderer, done: Any) -> None:
    if renderer.json_mode:
        return renderer.print_json({"job_id": done.job_id, "run_id": done.run_id, "script": done.script_path})
    out = renderer.out
    if done.job_id is None:  # --dry-run: the script itself, unwrapped, so it can be piped into a file
        out.print(done.script, markup=False, highlight=False, end="", soft_wrap=True)
        return
    out.print(f"submitted Slurm job {done.job_id} for run {done.run_id}", markup=False)
    out.print(f"batch script: {done.script_path}", markup=False, soft_wrap=True)
    out.print(f"follow it with: trainpipe status  (squeue -j {done.job_id}; log in "
              f"{Path(done.script_path).parent}/slurm-{done.job_id}.out)", markup=False, soft_wrap=True)


def scheduler_jobs(out: Console, report: dict[str, Any]) -> None:
    out.rule("scheduler jobs")
    table = Table()
    for column in ("scheduler", "job", "restart", "nodes", "started", "ended", "how it ended"):
        table.add_column(column)
    for job in report["scheduler_jobs"]:
        ended = job["end_reason"] or ("running" if report["state"] == "running" else "ended without a record")
        if job["requeued"]:
            ended += ", requeued"
        table.add_row(job["scheduler"], escape(job["job_id"]), str(job["restart_count"]), escape(job["nodes"] or "-"),
                      humanize.when(job["started_at"]), humanize.when(job["ended_at"]) if job["ended_at"] else "-",
                      ended)
    out.print(table)
    if (report.get("job") or {}).get("queued"):
        out.print(f"waiting in the queue: job {report['job']['job_id']} was requeued and resumes the run when it "
                  "starts", markup=False)
