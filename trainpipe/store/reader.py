"""The ledger's read half: every query `status`, `inspect` and the exports make, in portable SQL.

Why it is separate from `Ledger` (store/ledger.py), which inherits all of it: importing SQLAlchemy
costs ~0.35 s on a 2-core box, more than the whole budget of `trainpipe status`. So a SQLite ledger
that is already migrated is read through the stdlib `sqlite3` module (`open_for_reading`), and
SQLAlchemy is imported only when something must be written (a dead owner found by `status`, a
migration) or the database is not a SQLite file. The queries are the same text either way:
`:name` parameters are understood by both sqlite3 and SQLAlchemy's `text()`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from trainpipe.errors import LedgerError, RunNotFound, TrainpipeError


HOST = socket.gethostname()
LEDGER_HINT = "pass --db sqlite:///PATH (or set TRAINPIPE_DB) to use another ledger"

# The Alembic revisions this version knows, oldest first (store/migrations/versions/; a test checks HEAD
# against Alembic's script directory). trainpipe 0.1.0, before Alembic, recorded the same names as rows
# of schema_migrations. Reading these here, not through Alembic, keeps `status` from importing it.
MIGRATION_NAMES = ("0001_initial", "0002_error_kinds", "0003_lookup_indexes", "0004_attempt_worker",
                   "0005_stage_cache", "0006_sweeps", "0007_lineage", "0008_scheduler_jobs")
HEAD = MIGRATION_NAMES[-1]
# The row schema_migrations gets once Alembic owns the schema: trainpipe 0.1.0 reads only that table,
# and so refuses such a ledger as "created by a newer trainpipe" rather than writing to it.
ALEMBIC_MARKER = "alembic"

# SQLite stores JSON as text and booleans as 0/1; rows are decoded by column name. A test checks these
# against the JSON and Boolean columns of store/schema.py.
_JSON_COLUMNS = frozenset({"config_snapshot", "cache_policy", "overrides", "metrics", "detail", "value",
                           "threshold", "spec", "params", "lineage"})
_BOOL_COLUMNS = frozenset({"passed", "requeued"})
_IN_CHUNK = 500  # ids per IN (...) list: far below SQLite's host-parameter limit

_RUN_LISTING = ("run_id, pipeline_id, state, current_stage, created_at, updated_at, finished_at, owner_pid, "
                "owner_host, heartbeat_at, output_dir, error, error_kind")


def default_db_url() -> str:
    if os.environ.get("TRAINPIPE_DB"):
        return os.environ["TRAINPIPE_DB"]
    home = Path(os.environ.get("TRAINPIPE_HOME") or Path.home() / ".trainpipe")
    return f"sqlite:///{home / 'ledger.db'}"


class StaleState(TrainpipeError):
    """A compare-and-set lost: the run moved since the caller looked."""


def sqlite_file(url: str) -> Path | None:
    """The file behind a plain `sqlite:///PATH` URL; None for anything else (another database,
    `:memory:`, driver or query options), which only SQLAlchemy opens."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url.removeprefix("sqlite:///")
    if path in ("", ":memory:") or path.startswith("file:"):
        return None
    return Path(path).expanduser()


def sqlite_problem(where: str, text: str) -> str:
    """The database's complaint, as the user can act on it."""
    text = text.lower()
    if "file is not a database" in text:
        return f"ledger {where} is not an SQLite database; is --db pointing at the right file?"
    if "readonly" in text or "read-only" in text:
        return f"ledger {where} is read-only; trainpipe records every run there and needs to write it"
    if "unable to open" in text:
        return f"ledger {where} cannot be opened; check the path and the permissions of its directory"
    if "locked" in text:
        return f"ledger {where} is locked by another process (waited 30 s)"
    if "malformed" in text:
        return f"ledger {where} is damaged ({text}); restore it from a backup or use another --db"
    return f"ledger {where}: {text}"


def schema_revision(where: str, tables: set[str], version: str | None,
                    applied: set[str] | None) -> tuple[str | None, bool]:
    """Where a ledger's schema stands: (revision, legacy). `version` is alembic_version's row (None
    without one), `applied` the names in schema_migrations (None without that table, which every
    ledger has). `revision` is None for an empty database; `legacy` means a ledger the pre-Alembic
    runner migrated, to be stamped at `revision` before upgrading. LedgerError when the database is
    not a trainpipe ledger or a newer trainpipe made it. A migration is due unless (HEAD, False)."""
    if applied is None:
        if tables:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise LedgerError(f"ledger {where} is a database but not a trainpipe ledger "
                              f"(tables: {shown}; no schema_migrations)", hint=LEDGER_HINT)
        return None, False
    unknown = applied - set(MIGRATION_NAMES) - {ALEMBIC_MARKER}
    if version is not None and version not in MIGRATION_NAMES:
        unknown.add(version)
    if unknown:
        raise LedgerError(f"ledger {where} was created by a newer trainpipe (schema steps "
                          f"{', '.join(sorted(unknown))} are unknown to this version); upgrade trainpipe",
                          hint="pip install -U trainpipe; or " + LEDGER_HINT)
    if version is not None:
        return version, False
    # The old runner matched names as a set; stamp at the last step before the first one missing, and
    # the upgrade re-runs the later ones, which check before they add.
    done = None
    for name in MIGRATION_NAMES:
        if name not in applied:
            break
        done = name
    return done, True


def _connect(file: Path) -> sqlite3.Connection:
    # mode=rw never creates the file, and falls back to read-only where the OS denies writing.
    return sqlite3.connect(f"file:{quote(str(file))}?mode=rw", uri=True, timeout=30)


class LedgerReader:
    """Read-only queries over a ledger. Use `store.opening.open_for_reading`; `Ledger` adds the writes."""

    # SQLite hands JSON columns back as text; a database with a JSON type decodes them itself.
    _json_as_text = True

    def __init__(self, url: str, file: Path | None):
        self.url = url
        self._file = file
        self.where = str(file) if file is not None else url

    def close(self) -> None:
        pass

    def _query(self, sql: str, params: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        # WAL lets this read run beside a writer; the timeout covers a writer checkpointing.
        try:
            conn = _connect(self._file)
            try:
                cursor = conn.execute(sql, params)
                return [d[0] for d in cursor.description or ()], cursor.fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise LedgerError(sqlite_problem(self.where, str(exc)), hint=LEDGER_HINT) from None

    def _read(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Rows of one SELECT as dicts, JSON and boolean columns decoded."""
        columns, rows = self._query(sql, params)
        records = [dict(zip(columns, row)) for row in rows]
        decoders = [(c, _from_json) for c in columns if c in _JSON_COLUMNS and self._json_as_text]
        decoders += [(c, bool) for c in columns if c in _BOOL_COLUMNS]
        for record in records if decoders else ():
            for column, decode in decoders:
                if record[column] is not None:
                    record[column] = decode(record[column])
        return records

    # ------------------------------------------------------------ runs

    def get_run(self, run_id: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM runs WHERE run_id = :run_id", run_id=run_id)
        if not rows:
            raise RunNotFound(f"no run with id '{run_id}'", hint="`trainpipe status --all` lists runs")
        return rows[0]

    def list_runs(self, *, limit: int | None = 50, offset: int = 0, states: Iterable[str] | None = None,
                  pipeline: str | None = None, sweep: str | None = None,
                  id_contains: str | None = None) -> list[dict[str, Any]]:
        """Newest first, without the config snapshot (large, and a listing never needs it). The filters
        are those of `trainpipe ui`'s runs page; `count_runs` takes the same ones."""
        params: dict[str, Any] = {}
        where = _run_filter(params, states, pipeline, sweep, id_contains)
        # run_id breaks created_at ties, so pages neither repeat nor skip a run.
        sql = f"SELECT {_RUN_LISTING} FROM runs {where} ORDER BY created_at DESC, run_id"
        if limit:
            sql += " LIMIT :limit OFFSET :offset"
            params.update(limit=limit, offset=offset)
        return self._read(sql, **params)

    def count_runs(self, *, states: Iterable[str] | None = None, pipeline: str | None = None,
                   sweep: str | None = None, id_contains: str | None = None) -> int:
        params: dict[str, Any] = {}
        where = _run_filter(params, states, pipeline, sweep, id_contains)
        return int(self._read(f"SELECT COUNT(*) AS n FROM runs {where}", **params)[0]["n"] or 0)

    def pipelines(self) -> list[str]:
        return [r["pipeline_id"] for r in self._read("SELECT DISTINCT pipeline_id FROM runs ORDER BY pipeline_id")]

    def stage_progress(self, run_ids: list[str]) -> dict[str, tuple[int, int]]:
        """run_id -> (stages done, stages total), for the status table."""
        progress: dict[str, tuple[int, int]] = {}
        for start in range(0, len(run_ids), _IN_CHUNK):
            params: dict[str, Any] = {}
            ids = _placeholders("run", run_ids[start:start + _IN_CHUNK], params)
            for row in self._read("SELECT run_id, SUM(CASE WHEN state IN ('passed', 'skipped', 'cached') "
                                  f"THEN 1 ELSE 0 END) AS done, COUNT(*) AS total FROM stages "
                                  f"WHERE run_id IN ({ids}) GROUP BY run_id", **params):
                progress[row["run_id"]] = (int(row["done"] or 0), int(row["total"]))
        return progress

    def stages(self, run_id: str) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM stages WHERE run_id = :run_id ORDER BY position", run_id=run_id)

    # ------------------------------------------------------------ what happened in a run

    def attempts(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        return self._by_run("stage_attempts", run_id, stage)

    def checkpoints(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        return self._by_run("checkpoints", run_id, stage)

    def metrics(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        return self._by_run("metrics", run_id, stage)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self._by_run("artifacts", run_id)

    def transitions(self, run_id: str) -> list[dict[str, Any]]:
        return self._by_run("transitions", run_id)

    def scheduler_jobs(self, run_id: str) -> list[dict[str, Any]]:
        """Each scheduler job (Slurm) that ran the run's command, oldest first."""
        return self._by_run("scheduler_jobs", run_id)

    def latest_jobs(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        """run id -> its newest scheduler job, for the runs that have one (`status`)."""
        latest: dict[str, dict[str, Any]] = {}
        for start in range(0, len(run_ids), _IN_CHUNK):
            params: dict[str, Any] = {}
            ids = _placeholders("r", run_ids[start:start + _IN_CHUNK], params)
            for row in self._read(f"SELECT * FROM scheduler_jobs WHERE id IN (SELECT MAX(id) FROM scheduler_jobs "
                                  f"WHERE run_id IN ({ids}) GROUP BY run_id)", **params):
                latest[row["run_id"]] = row
        return latest

    def gates(self, run_id: str) -> list[dict[str, Any]]:
        gates = self._by_run("gate_results", run_id)
        checks = self._read("SELECT c.* FROM gate_checks c JOIN gate_results g ON c.gate_result_id = g.id "
                            "WHERE g.run_id = :run_id ORDER BY c.id", run_id=run_id)
        for gate in gates:
            gate["checks"] = [c for c in checks if c["gate_result_id"] == gate["id"]]
        return gates

    def _by_run(self, table: str, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        if stage:
            return self._read(f"SELECT * FROM {table} WHERE run_id = :run_id AND stage = :stage ORDER BY id",
                              run_id=run_id, stage=stage)
        return self._read(f"SELECT * FROM {table} WHERE run_id = :run_id ORDER BY id", run_id=run_id)

    def trained_origin(self, run_id: str, stage: str) -> dict[str, Any] | None:
        """For a `cached` stage, the run that trained it (following reuse of reuse) and that run's last
        attempt; None for a stage that was not reused, or whose origin is no longer in the ledger."""
        seen = set()
        current = run_id
        while current not in seen:
            seen.add(current)
            rows = self._read("SELECT state, cached_from_run FROM stages WHERE run_id = :run_id AND name = :stage",
                              run_id=current, stage=stage)
            if not rows:
                return None
            if rows[0]["state"] != "cached":
                if current == run_id:
                    return None
                attempts = self.attempts(current, stage)
                run_dir = self._read("SELECT run_dir FROM runs WHERE run_id = :run_id", run_id=current)
                return {"run_id": current, "run_dir": run_dir[0]["run_dir"] if run_dir else None,
                        "attempt": attempts[-1] if attempts else None}
            current = rows[0]["cached_from_run"]
        return None

    # ------------------------------------------------------------ sweeps

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM sweeps WHERE sweep_id = :sweep_id", sweep_id=sweep_id)
        if not rows:
            raise RunNotFound(f"no sweep with id '{sweep_id}'")
        return rows[0]

    def list_sweeps(self) -> list[dict[str, Any]]:
        """Newest first, with how many trials each has and how many are done."""
        return self._read("SELECT s.sweep_id, s.state, s.sweep_file, s.created_at, s.finished_at, "
                          "COUNT(t.number) AS trials, SUM(CASE WHEN t.state = 'done' THEN 1 ELSE 0 END) AS done "
                          "FROM sweeps s LEFT JOIN sweep_trials t ON t.sweep_id = s.sweep_id "
                          "GROUP BY s.sweep_id, s.state, s.sweep_file, s.created_at, s.finished_at "
                          "ORDER BY s.created_at DESC")

    def sweep_trials(self, sweep_id: str) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM sweep_trials WHERE sweep_id = :sweep_id ORDER BY number", sweep_id=sweep_id)

    def find_run(self, run_id: str) -> dict[str, Any] | None:
        try:
            return self.get_run(run_id)
        except RunNotFound:
            return None

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0]["integrity_check"])


def _from_json(value: Any) -> Any:
    # A JSON column has NUMERIC affinity in SQLite: the text '0.5' comes back as the float 0.5.
    return json.loads(value) if isinstance(value, str) else value


def _run_filter(params: dict[str, Any], states: Iterable[str] | None, pipeline: str | None, sweep: str | None,
                id_contains: str | None) -> str:
    clauses = []
    if states is not None:
        clauses.append(f"state IN ({_placeholders('state', list(states), params)})")
    if pipeline:
        clauses.append("pipeline_id = :pipeline")
        params["pipeline"] = pipeline
    if sweep:
        clauses.append("run_id IN (SELECT run_id FROM sweep_trials WHERE sweep_id = :sweep)")
        params["sweep"] = sweep
    if id_contains:
        # '!' as the escape character: SQLite has no default one, PostgreSQL's is the backslash.
        escaped = id_contains.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        clauses.append("run_id LIKE :id_like ESCAPE '!'")
        params["id_like"] = f"%{escaped}%"
    return ("WHERE " + " AND ".join(clauses)) if clauses else ""


def _placeholders(prefix: str, values: list[Any], params: dict[str, Any]) -> str:
    names = []
    for index, value in enumerate(values):
        params[f"{prefix}{index}"] = value
        names.append(f":{prefix}{index}")
    return ", ".join(names) or "NULL"
