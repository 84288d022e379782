"""The stage cache: fingerprints, reuse links, leases.

Revision ID: 0005_stage_cache
Revises: 0004_attempt_worker
"""

from trainpipe.store import schema as s
from trainpipe.store.migrations.ops import add_columns, create_indexes, create_tables, no_downgrade

revision = "0005_stage_cache"
down_revision = "0004_attempt_worker"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_columns(s.stages.c.fingerprint, s.stages.c.cached_from_run, s.stages.c.cached_from_stage,
                s.stages.c.cache_note, s.gate_results.c.carried_from, s.runs.c.cache_policy)
    create_indexes(*s.stages.indexes)
    create_tables(s.stage_leases)


downgrade = no_downgrade
