"""Alembic environment: the caller (`trainpipe.store.ledger.migrate`) passes an open connection, already
inside the write transaction, so that a migration and the check that it was due are one atomic step."""

from alembic import context

connection = context.config.attributes["connection"]
# Batch mode: SQLite's ALTER TABLE cannot drop or alter columns; Alembic copies the table instead.
# On PostgreSQL the same directives are plain ALTERs.
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():  # the caller's transaction: Alembic neither commits nor rolls back
    context.run_migrations()
