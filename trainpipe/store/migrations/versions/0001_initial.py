"""The ledger's tables, as store/schema.py has them.

Revision ID: 0001_initial
Revises: 
"""

from trainpipe.store.migrations.ops import create_tables, no_downgrade

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables()


downgrade = no_downgrade
