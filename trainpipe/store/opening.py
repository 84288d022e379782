"""Opening a ledger for the read commands (`status`, `inspect`, `ui`) without paying for SQLAlchemy,
and upgrading such a reader to the full `Ledger` for the rare write a reader's caller must make.

This is the one module that knows both halves: the reader (store/reader.py) never imports the
ledger back, and the ledger (store/ledger.py) builds on the reader.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from trainpipe.errors import LedgerError
from trainpipe.store.reader import (
    HEAD,
    LEDGER_HINT,
    LedgerReader,
    _connect,
    default_db_url,
    schema_revision,
    sqlite_file,
    sqlite_problem,
)

if TYPE_CHECKING:
    from trainpipe.store.ledger import Ledger


def open_for_reading(url: str | None = None) -> LedgerReader | Ledger:
    """A reader for `status` and `inspect`: the stdlib-sqlite3 one when `url` is a SQLite file that
    is already at HEAD, else the full Ledger (which creates, migrates with Alembic, and validates)."""
    url = url or default_db_url()
    file = sqlite_file(url)
    if file is not None and file.is_file():
        try:
            conn = _connect(file)
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                applied = ({r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
                           if "schema_migrations" in tables else None)
                version = (conn.execute("SELECT max(version_num) FROM alembic_version").fetchone()[0]
                           if "alembic_version" in tables else None)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise LedgerError(sqlite_problem(str(file), str(exc)), hint=LEDGER_HINT) from None
        if schema_revision(str(file), tables, version, applied) == (HEAD, False):
            return LedgerReader(url, file)
    from trainpipe.store.ledger import Ledger

    return Ledger(url)


def writable(ledger: LedgerReader) -> Ledger:
    """The full ledger behind a reader (itself when it is one already): a dead owner's run found by
    `status` is marked interrupted through it, with SQLAlchemy imported for that write only."""
    from trainpipe.store.ledger import Ledger

    return ledger if isinstance(ledger, Ledger) else Ledger(ledger.url)


class LedgerOnFirstUse:
    """The full Ledger, opened (created and migrated, if new) on its first use. A run refused for its
    input (a bad config, a bad dataset row, a failed preflight) is refused before it needs the ledger,
    and so leaves no ledger file or directory behind."""

    def __init__(self, url: str | None = None):
        from trainpipe.store.reader import default_db_url

        self.url = url or default_db_url()
        self._ledger: Ledger | None = None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._ledger is None:
            from trainpipe.store.ledger import Ledger

            self._ledger = Ledger(self.url)
        return getattr(self._ledger, name)
