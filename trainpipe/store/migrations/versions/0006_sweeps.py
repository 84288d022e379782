"""Sweeps and their trials.

Revision ID: 0006_sweeps
Revises: 0005_stage_cache
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import create_tables, no_downgrade

revision = "0006_sweeps"
down_revision = "0005_stage_cache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(s.sweeps, s.sweep_trials)


downgrade = no_downgrade
