"""Ledger tables (SQLAlchemy Core). Times are UNIX seconds (REAL) so durations need no parsing."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("run_id", String(128), primary_key=True),
    Column("pipeline_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("config_path", Text),
    Column("config_snapshot", JSON, nullable=False),
    Column("output_dir", Text, nullable=False),
    Column("run_dir", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("owner_pid", Integer),
    Column("owner_host", String(255)),
    Column("heartbeat_at", Float),
    Column("current_stage", String(16)),
    Column("final_model_path", Text),
    Column("error", Text),
    Column("error_kind", String(16)),  # user, transient, bug (trainpipe/failures.py); migration 0002
    Column("error_traceback", Text),   # kept for `bug`: what `inspect` shows
    # migration 0005: {"use_cache": bool, "from_stage": str | None}; a resume keeps the run's choice
    Column("cache_policy", JSON),
    # migration 0007: where the run's model came from and what it ran on (engine/lineage.py): dataset
    # sha256s, base model id and revision or content hash, library versions, device, world size, seed.
    Column("lineage", JSON),
)
Index("ix_runs_created", runs.c.created_at)

stages = Table(
    "stages", metadata,
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(16), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("output_path", Text),
    Column("updated_at", Float, nullable=False),
    # migration 0005: the stage cache (engine/cache.py)
    Column("fingerprint", String(64)),        # computed before the stage runs (engine/fingerprint.py)
    Column("cached_from_run", String(128)),   # a `cached` stage: the run whose verified output it reuses
    Column("cached_from_stage", String(16)),
    Column("cache_note", Text),               # why an earlier output was not reused, when one existed
)
Index("ix_stages_fingerprint", stages.c.fingerprint)

stage_attempts = Table(
    "stage_attempts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),  # running, passed, failed, rejected, interrupted, timed_out
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("pid", Integer),
    # How the attempt's process started: "fork" (from the pre-imported stage worker, attempt/zygote.py),
    # "spawn" (a fresh interpreter) or "torchrun" (a stage with a launcher; pid is torchrun's); 0004.
    Column("worker", String(16)),
    Column("host", String(255)),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("resumed_from", Text),
    Column("overrides", JSON),  # e.g. the OOM retry's halved batch
    Column("metrics", JSON),
    Column("error_kind", String(16)),  # migration 0002
    Column("error_traceback", Text),
    UniqueConstraint("run_id", "stage", "attempt"),
)

transitions = Table(
    "transitions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16)),  # NULL for run-level transitions
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("trigger", String(32), nullable=False),
    Column("at", Float, nullable=False),
    Column("pid", Integer),
    Column("host", String(255)),
    Column("detail", JSON),
)
Index("ix_transitions_run", transitions.c.run_id, transitions.c.id)

checkpoints = Table(
    "checkpoints", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("attempt_id", Integer, ForeignKey("stage_attempts.id")),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("manifest_sha256", String(64)),
    Column("created_at", Float, nullable=False),
)

gate_results = Table(
    "gate_results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("attempt_id", Integer, ForeignKey("stage_attempts.id")),
    Column("gate", String(32), nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("carried_from", String(128)),  # migration 0005: copied from this run's gate when the stage was cached
)

gate_checks = Table(
    "gate_checks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gate_result_id", Integer, ForeignKey("gate_results.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("severity", String(8), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("value", JSON),
    Column("threshold", JSON),
    Column("duration_s", Float),
    Column("details", Text),
)

metrics = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("attempt_id", Integer, ForeignKey("stage_attempts.id")),
    Column("step", Integer, nullable=False),
    Column("name", String(64), nullable=False),
    Column("value", Float),  # NULL stores a NaN/inf the trainer logged; see `raw`
    Column("raw", String(32)),
)
Index("ix_metrics_run_stage", metrics.c.run_id, metrics.c.stage)

artifacts = Table(
    "artifacts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Lookups by run that `inspect` and resume make; without them a 10,000-run ledger is scanned whole
# for each. Migration 0003 adds them to older ledgers.
LOOKUP_INDEXES = [
    Index("ix_checkpoints_run", checkpoints.c.run_id, checkpoints.c.stage),
    Index("ix_gate_results_run", gate_results.c.run_id),
    Index("ix_gate_checks_gate", gate_checks.c.gate_result_id),
    Index("ix_artifacts_run", artifacts.c.run_id),
]

# migration 0005: which run is training a stage of a given fingerprint right now, so that another run
# needing the same stage waits and reuses it rather than training it a second time concurrently.
stage_leases = Table(
    "stage_leases", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("stage", String(16), nullable=False),
    Column("run_id", String(128), nullable=False),
    Column("claimed_at", Float, nullable=False),
)

# migration 0008: each time a batch scheduler (Slurm) started the run's command: a requeued job is the
# same job id with a higher restart count (engine/scheduler.py). `end_reason` is how that job's process
# left the run: succeeded, failed, rejected, preempted (warned, then requeued), requeue_refused, ...
scheduler_jobs = Table(
    "scheduler_jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("scheduler", String(16), nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("restart_count", Integer, nullable=False),
    Column("nodes", Text),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("end_reason", String(32)),
    Column("requeued", Boolean),  # this job asked the scheduler to requeue it when it ended
)
Index("ix_scheduler_jobs_run", scheduler_jobs.c.run_id, scheduler_jobs.c.id)

schema_migrations = Table(
    "schema_migrations", metadata,
    Column("name", String(64), primary_key=True),
    Column("applied_at", Float, nullable=False),
)

# migration 0006: sweeps (engine/sweep.py). A trial is an ordinary run; sweep_trials links it.
sweeps = Table(
    "sweeps", metadata,
    Column("sweep_id", String(128), primary_key=True),
    Column("state", String(16), nullable=False),  # running, interrupted, finished
    Column("sweep_file", Text),
    Column("spec", JSON, nullable=False),         # the validated sweep file, paths resolved
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("owner_pid", Integer),
    Column("owner_host", String(255)),
    Column("best_trial", Integer),
)

sweep_trials = Table(
    "sweep_trials", metadata,
    Column("sweep_id", String(128), ForeignKey("sweeps.sweep_id", ondelete="CASCADE"), primary_key=True),
    Column("number", Integer, primary_key=True),  # Optuna's trial number
    Column("params", JSON, nullable=False),
    # Not a foreign key: the row is written before its run, so a sweep killed in between finds the
    # id on resume and starts the run under it.
    Column("run_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),  # pending, running (claimed by owner_pid), done
    Column("objective", Float),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("owner_pid", Integer),   # the process that claimed it last (kept when done: who ran it)
    Column("owner_host", String(255)),
    Column("claimed_at", Float),
)
