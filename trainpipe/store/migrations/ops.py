"""Operations shared by the revisions (versions/). Every step checks before it adds: 0001 creates the tables from the current
metadata (store/schema.py), so a ledger created by this version already has what later steps add, and a
ledger that the pre-Alembic runner (trainpipe 0.1.0) migrated is stamped at the last step it recorded
and may be upgraded over columns or indexes it already has."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def add_columns(*columns: sa.Column) -> None:
    conn = op.get_bind()
    inspector = sa.inspect(conn)
    for column in columns:
        table = column.table.name
        if column.name in {c["name"] for c in inspector.get_columns(table)}:
            continue
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(column.name, column.type, nullable=True))


def no_downgrade() -> None:
    # Dropping a column of a SQLite table means recreating it, and dropping a parent table with
    # foreign keys on deletes every child row through ON DELETE CASCADE. A ledger is an audit record:
    # going back is restoring a backup, not a migration.
    raise NotImplementedError("ledger migrations do not downgrade; restore a backup of the ledger")


def create_indexes(*indexes: sa.Index) -> None:
    conn = op.get_bind()
    for index in indexes:
        index.create(conn, checkfirst=True)


def create_tables(*tables: sa.Table) -> None:
    from trainpipe.store import schema

    schema.metadata.create_all(op.get_bind(), tables=list(tables) or None, checkfirst=True)
