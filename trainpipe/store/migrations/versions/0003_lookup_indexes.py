"""Indexes for the by-run lookups of `inspect` and resume.

Revision ID: 0003_lookup_indexes
Revises: 0002_error_kinds
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import create_indexes, no_downgrade

revision = "0003_lookup_indexes"
down_revision = "0002_error_kinds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_indexes(*s.LOOKUP_INDEXES)


downgrade = no_downgrade
