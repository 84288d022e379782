"""Error kinds (user, transient, bug) and tracebacks on runs and attempts.

Revision ID: 0002_error_kinds
Revises: 0001_initial
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import add_columns, no_downgrade

revision = "0002_error_kinds"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_columns(s.runs.c.error_kind, s.runs.c.error_traceback,
                s.stage_attempts.c.error_kind, s.stage_attempts.c.error_traceback)


downgrade = no_downgrade
