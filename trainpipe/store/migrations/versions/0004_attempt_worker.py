"""How an attempt's process started (fork or spawn).

Revision ID: 0004_attempt_worker
Revises: 0003_lookup_indexes
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import add_columns, no_downgrade

revision = "0004_attempt_worker"
down_revision = "0003_lookup_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_columns(s.stage_attempts.c.worker)


downgrade = no_downgrade
