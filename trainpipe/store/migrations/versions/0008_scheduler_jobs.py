"""The scheduler jobs (Slurm) that ran each run's command.

Revision ID: 0008_scheduler_jobs
Revises: 0007_lineage
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import create_tables, no_downgrade

revision = "0008_scheduler_jobs"
down_revision = "0007_lineage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(s.scheduler_jobs)


downgrade = no_downgrade
