"""The per-run lineage record.

Revision ID: 0007_lineage
Revises: 0006_sweeps
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import add_columns, no_downgrade

revision = "0007_lineage"
down_revision = "0006_sweeps"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_columns(s.runs.c.lineage)


downgrade = no_downgrade
