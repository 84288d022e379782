"""Alembic migrations of the ledger, driven by `Ledger._open` (store/ledger.py); no alembic.ini."""
