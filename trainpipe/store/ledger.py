"""The ledger: the only code that reads or writes the database.

Guarantees:
- every state change and its transition row commit in one transaction, or neither does;
- a state change is a compare-and-set: it fires only from the state the caller's resolver saw,
  under a write lock, so two observers cannot both act on one run. SQLite: `BEGIN IMMEDIATE` locks
  the whole file. PostgreSQL (READ COMMITTED): each write first locks the row it decides on
  (`SELECT ... FOR UPDATE`), or is one UPDATE whose WHERE PostgreSQL re-checks after waiting for the
  row, or inserts a key that only one transaction can insert;
- the transitions table is append-only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, make_url, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError

from trainpipe.errors import LedgerError, RunNotFound
from trainpipe.paths import dir_problem
from trainpipe.store import schema as s
from trainpipe.store.reader import (  # noqa: F401 - HOST, StaleState, default_db_url: imported from here too
    ALEMBIC_MARKER,
    HEAD,
    HOST,
    LEDGER_HINT,
    LedgerReader,
    StaleState,
    default_db_url,
    schema_revision,
    sqlite_file,
    sqlite_problem,
)


MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Of two processes opening a new PostgreSQL ledger, one migrates and the other waits, then finds it done
# (SQLite gets the same from BEGIN IMMEDIATE). Any constant works; this one spells "tpip".
_PG_MIGRATION_LOCK = 0x74706970


def migrate(conn: Connection, *, stamp: str | None = None) -> None:
    """Upgrade the ledger on `conn` to HEAD with Alembic, inside the caller's transaction; first, with
    `stamp`, record that a ledger the pre-Alembic runner made is already at that revision.
    Alembic is imported here only: most opens find nothing due and never load it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    if stamp is not None:
        command.stamp(config, stamp)
    command.upgrade(config, "head")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own BEGIN handling would defeat BEGIN IMMEDIATE below.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # journal_mode=WAL is persistent and a write: Ledger._open sets it once the file is known to be ours.
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the lock up front: a deferred transaction that later upgrades to a write lock
    # can fail with "database is locked" without waiting for busy_timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("tp_write") else "BEGIN")


def _finite(value: Any) -> tuple[float | None, str | None]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, str(value)[:32]
    return (number, None) if math.isfinite(number) else (None, repr(number))


class Ledger(LedgerReader):
    """The ledger, reads (inherited from LedgerReader) and writes. Writes go through SQLAlchemy."""

    def __init__(self, url: str | None = None):
        """Open (creating if new) and migrate a ledger. Raises LedgerError, and writes nothing, when
        the file cannot be created, is not an SQLite database, is not a trainpipe ledger, or comes
        from a newer trainpipe."""
        self.url = url or default_db_url()
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise LedgerError(f"ledger URL '{self.url}' is not an SQLAlchemy URL",
                              hint="e.g. --db sqlite:////abs/path/ledger.db") from None
        self.where = parsed.render_as_string(hide_password=True)
        self._file: Path | None = None
        database = parsed.database or ""
        if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") \
                and not database.startswith("file:"):
            file = Path(database).expanduser()
            self.where = str(file)
            # Read through the stdlib driver unless the URL carries options only SQLAlchemy applies.
            self._file = file if sqlite_file(self.url) is not None else None
            if file.is_dir():
                raise LedgerError(f"ledger {file} is a directory; --db must name a file", hint=LEDGER_HINT)
            # Only when the directory is missing: a read-only one still serves `status` and `inspect`.
            problem = None if file.parent.is_dir() else dir_problem(file.parent, create=True)
            if problem:
                raise LedgerError(f"ledger {file}: {problem}", hint=LEDGER_HINT)
        try:
            self._engine: Engine = create_engine(self.url, future=True)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise LedgerError(f"ledger URL '{self.where}' cannot be used: {exc}", hint=LEDGER_HINT) from None
        self._json_as_text = self._engine.dialect.name == "sqlite"
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
            event.listen(self._engine, "begin", _sqlite_begin)
        self._writer = self._engine.execution_options(tp_write=True)
        try:
            self._open()
        except DBAPIError as exc:
            self._engine.dispose()
            raise LedgerError(self._problem(exc), hint=LEDGER_HINT) from None
        except LedgerError:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._engine.dispose()

    def _problem(self, exc: DBAPIError) -> str:
        if self._engine.dialect.name != "sqlite":
            return f"ledger {self.where}: {' '.join(str(exc.orig).split())}"
        return sqlite_problem(self.where, str(exc.orig))

    def _query(self, sql: str, params: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        if self._file is not None:
            return super()._query(sql, params)
        with self._engine.connect() as conn:
            result = conn.execute(text(sql), params)
            return list(result.keys()), [tuple(row) for row in result.all()]

    def _open(self) -> None:
        # Read first: a database that is not ours, or is newer than us, is refused before anything is written.
        with self._engine.connect() as conn:
            revision, legacy, _ = self._schema(conn)
            if (revision, legacy) == (HEAD, False):
                self._check_columns(conn)
                return  # the common case: no write lock, no Alembic, and a read-only ledger can still be read
        if self._engine.dialect.name == "sqlite":
            raw = self._engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA journal_mode=WAL")
            finally:
                raw.close()
        with self._writer.begin() as conn:
            if self._engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            revision, legacy, applied = self._schema(conn)  # another process may have migrated since the read
            if (revision, legacy) != (HEAD, False):
                migrate(conn, stamp=revision if legacy else None)
            if ALEMBIC_MARKER not in applied:
                conn.execute(insert(s.schema_migrations).values(name=ALEMBIC_MARKER, applied_at=time.time()))
            self._check_columns(conn)  # raising here rolls the migration back: the ledger stays as it was

    def _schema(self, conn: Connection) -> tuple[str | None, bool, set[str]]:
        """(revision, legacy, schema_migrations names), as reader.schema_revision; LedgerError if the
        database is not a ledger this code can read."""
        tables = set(sa_inspect(conn).get_table_names())
        applied = (set(conn.scalars(select(s.schema_migrations.c.name)))
                   if s.schema_migrations.name in tables else None)
        version = (conn.scalar(text("SELECT max(version_num) FROM alembic_version"))
                   if "alembic_version" in tables else None)
        revision, legacy = schema_revision(self.where, tables, version, applied)
        return revision, legacy, applied or set()

    def _check_columns(self, conn: Connection) -> None:
        """LedgerError if a table lacks a column although the ledger is at HEAD."""
        inspector = sa_inspect(conn)
        tables = set(inspector.get_table_names())
        for table in s.metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)} if table.name in tables else set()
            missing = [c.name for c in table.columns if c.name not in have]
            if missing:
                raise LedgerError(f"ledger {self.where} is damaged: table {table.name} lacks "
                                  f"{', '.join(missing)} although every migration is recorded",
                                  hint=LEDGER_HINT)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE); a ledger that cannot be written raises LedgerError."""
        try:
            with self._writer.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise LedgerError(self._problem(exc), hint=LEDGER_HINT) from exc

    def check_writable(self) -> None:
        """LedgerError if a write would fail (a read-only file or directory, a full disk). Writes
        nothing: the probe row is rolled back."""
        try:
            with self._writer.connect() as conn:
                trans = conn.begin()
                try:
                    conn.execute(insert(s.schema_migrations).values(name="~write-probe", applied_at=0.0))
                finally:
                    trans.rollback()
        except OperationalError as exc:
            raise LedgerError(self._problem(exc), hint=LEDGER_HINT) from None

    # ------------------------------------------------------------ runs

    def create_run(self, *, run_id: str, pipeline_id: str, config_snapshot: dict[str, Any],
                   config_path: str | None, output_dir: str, run_dir: str,
                   stages: Iterable[str], cache_policy: dict[str, Any] | None = None,
                   lineage: dict[str, Any] | None = None) -> None:
        """Insert a pending run with its stages pending (and its lineage), and the `create` transition."""
        now = time.time()
        with self._write() as conn:
            conn.execute(insert(s.runs).values(
                run_id=run_id, pipeline_id=pipeline_id, state="pending", config_path=config_path,
                config_snapshot=config_snapshot, output_dir=output_dir, run_dir=run_dir,
                created_at=now, updated_at=now, cache_policy=cache_policy, lineage=lineage))
            for position, name in enumerate(stages):
                conn.execute(insert(s.stages).values(run_id=run_id, name=name, position=position,
                                                     state="pending", updated_at=now))
            self._append_transition(conn, run_id, None, None, "pending", "create", {})

    def _append_transition(self, conn: Connection, run_id: str, stage: str | None, from_state: str | None,
                           to_state: str, trigger: str, detail: dict[str, Any] | None) -> None:
        conn.execute(insert(s.transitions).values(
            run_id=run_id, stage=stage, from_state=from_state, to_state=to_state, trigger=trigger,
            at=time.time(), pid=os.getpid(), host=HOST, detail=detail or {}))

    def transition_run(self, run_id: str, trigger: str, resolve: Callable[[str], str], *,
                       detail: dict[str, Any] | None = None, expect_state: str | None = None,
                       set_owner: bool = False, clear_owner: bool = False,
                       **fields: Any) -> str:
        """Move a run by `trigger`; `resolve(current)` returns the new state or raises.

        With `expect_state`, the change only happens if the run is still in that state (the
        compare-and-set that liveness detection relies on); otherwise IllegalTransition is raised by
        `resolve` or a StaleState is raised here.
        """
        with self._write() as conn:
            row = conn.execute(select(s.runs.c.state).where(s.runs.c.run_id == run_id).with_for_update()).first()
            if row is None:
                raise RunNotFound(f"no run with id '{run_id}'")
            current = row.state
            if expect_state is not None and current != expect_state:
                raise StaleState(f"run {run_id} is {current}, not {expect_state}")
            new = resolve(current)
            values: dict[str, Any] = {"state": new, "updated_at": time.time(), **fields}
            if set_owner:
                values.update(owner_pid=os.getpid(), owner_host=HOST, heartbeat_at=time.time())
            if clear_owner:
                values.update(owner_pid=None, owner_host=None)
            if new in ("succeeded", "failed", "rejected", "cancelled", "interrupted"):
                values.setdefault("finished_at", time.time())
            elif new == "running":
                values["finished_at"] = None
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(**values))
            self._append_transition(conn, run_id, None, current, new, trigger, detail)
            return new

    def transition_stage(self, run_id: str, stage: str, trigger: str, resolve: Callable[[str], str], *,
                         detail: dict[str, Any] | None = None, output_path: str | None = None) -> str:
        with self._write() as conn:
            row = conn.execute(select(s.stages.c.state).where(
                s.stages.c.run_id == run_id, s.stages.c.name == stage).with_for_update()).first()
            if row is None:
                raise RunNotFound(f"run '{run_id}' has no stage '{stage}'")
            current = row.state
            new = resolve(current)
            values: dict[str, Any] = {"state": new, "updated_at": time.time()}
            if output_path is not None:
                values["output_path"] = output_path
            conn.execute(update(s.stages).where(s.stages.c.run_id == run_id, s.stages.c.name == stage)
                         .values(**values))
            run_values: dict[str, Any] = {"updated_at": time.time()}
            if new == "running":
                run_values["current_stage"] = stage
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(**run_values))
            self._append_transition(conn, run_id, stage, current, new, trigger, detail)
            return new

    # ------------------------------------------------------------ stage cache

    def set_stage_cache_info(self, run_id: str, stage: str, *, fingerprint: str | None,
                             cache_note: str | None) -> None:
        """Record a stage's fingerprint (computed before it runs) and why no earlier output was reused."""
        with self._write() as conn:
            conn.execute(update(s.stages).where(s.stages.c.run_id == run_id, s.stages.c.name == stage)
                         .values(fingerprint=fingerprint, cache_note=cache_note))

    def cache_candidates(self, stage: str, fingerprint: str, *, exclude_run: str) -> list[dict[str, Any]]:
        """Stages of other runs with this fingerprint that passed (or were themselves reused), newest
        first, with their run's run_dir. Whether their files still verify is the caller's to check."""
        query = (select(s.stages, s.runs.c.run_dir)
                 .join(s.runs, s.runs.c.run_id == s.stages.c.run_id)
                 .where(s.stages.c.fingerprint == fingerprint, s.stages.c.name == stage,
                        s.stages.c.state.in_(["passed", "cached"]), s.stages.c.run_id != exclude_run)
                 .order_by(s.stages.c.updated_at.desc()))
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def reuse_stage(self, run_id: str, stage: str, resolve: Callable[[str], str], *, source_run: str,
                    output_path: str, files: Iterable[tuple[str, int, str]], final_model_path: str | None,
                    detail: dict[str, Any]) -> str:
        """Make a stage `cached` in one transaction: the transition (a compare-and-set like any
        other), the link to the source run's stage, the artifacts now in this run's dir, the source's
        gate result carried over (marked so), and the run's final model path."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(select(s.stages.c.state).where(
                s.stages.c.run_id == run_id, s.stages.c.name == stage).with_for_update()).first()
            if row is None:
                raise RunNotFound(f"run '{run_id}' has no stage '{stage}'")
            new = resolve(row.state)
            conn.execute(update(s.stages).where(s.stages.c.run_id == run_id, s.stages.c.name == stage).values(
                state=new, updated_at=now, output_path=output_path, cached_from_run=source_run,
                cached_from_stage=stage, cache_note=None))
            rows = [{"run_id": run_id, "stage": stage, "path": p, "size_bytes": n, "sha256": h, "created_at": now}
                    for p, n, h in files]
            if rows:
                conn.execute(insert(s.artifacts), rows)
            gate = conn.execute(select(s.gate_results).where(
                s.gate_results.c.run_id == source_run, s.gate_results.c.stage == stage)
                .order_by(s.gate_results.c.id.desc())).mappings().first()
            if gate is not None:
                gate_id = conn.execute(insert(s.gate_results).values(
                    run_id=run_id, stage=stage, attempt_id=None, gate=gate["gate"], passed=gate["passed"],
                    created_at=now, carried_from=source_run)).inserted_primary_key[0]
                checks = conn.execute(select(s.gate_checks).where(s.gate_checks.c.gate_result_id == gate["id"])
                                      .order_by(s.gate_checks.c.id)).mappings().all()
                if checks:
                    conn.execute(insert(s.gate_checks), [
                        {**{k: v for k, v in c.items() if k not in ("id", "gate_result_id")}, "gate_result_id": gate_id}
                        for c in checks])
            run_values: dict[str, Any] = {"updated_at": now}
            if final_model_path is not None:
                run_values["final_model_path"] = final_model_path
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(**run_values))
            self._append_transition(conn, run_id, stage, row.state, new, "reuse_cached", detail)
            return new

    # ------------------------------------------------------------ sweeps

    def create_sweep(self, *, sweep_id: str, sweep_file: str, spec: dict[str, Any]) -> None:
        """Insert a running sweep owned by this process."""
        now = time.time()
        with self._write() as conn:
            conn.execute(insert(s.sweeps).values(sweep_id=sweep_id, state="running", sweep_file=sweep_file,
                                                 spec=spec, created_at=now, updated_at=now,
                                                 owner_pid=os.getpid(), owner_host=HOST))

    def set_sweep_state(self, sweep_id: str, state: str, *, expect_state: str | None = None,
                        set_owner: bool = False, **fields: Any) -> None:
        """Move a sweep to `state`; with `expect_state`, only from that state (a compare-and-set, as for
        runs: of two processes resuming one sweep, one raises StaleState)."""
        with self._write() as conn:
            row = conn.execute(select(s.sweeps.c.state).where(s.sweeps.c.sweep_id == sweep_id)
                               .with_for_update()).first()
            if row is None:
                raise RunNotFound(f"no sweep with id '{sweep_id}'")
            if expect_state is not None and row.state != expect_state:
                raise StaleState(f"sweep {sweep_id} is {row.state}, not {expect_state}")
            values: dict[str, Any] = {"state": state, "updated_at": time.time(), **fields}
            if set_owner:
                values.update(owner_pid=os.getpid(), owner_host=HOST)
            elif state != "running":
                values.update(owner_pid=None, owner_host=None)
            values["finished_at"] = time.time() if state == "finished" else None
            conn.execute(update(s.sweeps).where(s.sweeps.c.sweep_id == sweep_id).values(**values))

    def add_sweep_trials(self, sweep_id: str, trials: list[tuple[int, dict[str, Any], str]], *,
                         claim: bool = False) -> None:
        """Record trials (number, params, run id): `pending`, or with `claim` running and owned by this
        process."""
        now = time.time()
        owner = {"state": "running", "owner_pid": os.getpid(), "owner_host": HOST, "claimed_at": now} if claim \
            else {"state": "pending"}
        with self._write() as conn:
            conn.execute(insert(s.sweep_trials), [
                {"sweep_id": sweep_id, "number": number, "params": params, "run_id": run_id, "created_at": now,
                 **owner} for number, params, run_id in trials])

    def claim_sweep_trial(self, sweep_id: str, number: int, *, expect_state: str,
                          expect_owner: tuple[int | None, str | None]) -> bool:
        """Compare-and-set a trial to `running`, owned by this process, if it is still in the state and
        owned by the owner the caller saw. Of two workers claiming one trial, exactly one gets True."""
        with self._write() as conn:
            result = conn.execute(update(s.sweep_trials).where(
                s.sweep_trials.c.sweep_id == sweep_id, s.sweep_trials.c.number == number,
                s.sweep_trials.c.state == expect_state,
                s.sweep_trials.c.owner_pid.is_(None) if expect_owner[0] is None
                else s.sweep_trials.c.owner_pid == expect_owner[0],
                s.sweep_trials.c.owner_host.is_(None) if expect_owner[1] is None
                else s.sweep_trials.c.owner_host == expect_owner[1],
            ).values(state="running", owner_pid=os.getpid(), owner_host=HOST, claimed_at=time.time()))
            return result.rowcount == 1

    # ------------------------------------------------------------ stage leases

    def acquire_stage_lease(self, fingerprint: str, stage: str, run_id: str, *,
                            replace_run: str | None = None) -> dict[str, Any] | None:
        """Take the lease on training this fingerprint for `run_id`: None when it is ours (it was free,
        already ours, or held by `replace_run`, whose owner the caller found dead), else the holder's row."""
        lease = select(s.stage_leases).where(s.stage_leases.c.fingerprint == fingerprint).with_for_update()
        with self._write() as conn:
            row = conn.execute(lease).mappings().first()
            if row is None:
                try:
                    # FOR UPDATE cannot lock a row that does not exist yet: on PostgreSQL two runs may both
                    # get here; the second insert waits for the first and fails on the key, and that run
                    # then reads the winner's row like any other holder.
                    with conn.begin_nested():
                        conn.execute(insert(s.stage_leases).values(fingerprint=fingerprint, stage=stage,
                                                                   run_id=run_id, claimed_at=time.time()))
                    return None
                except IntegrityError:
                    row = conn.execute(lease).mappings().one()
            if row["run_id"] == run_id:
                return None
            if replace_run is not None and row["run_id"] == replace_run:
                conn.execute(update(s.stage_leases).where(s.stage_leases.c.fingerprint == fingerprint)
                             .values(run_id=run_id, stage=stage, claimed_at=time.time()))
                return None
            return dict(row)

    def release_stage_lease(self, fingerprint: str, run_id: str) -> None:
        with self._write() as conn:
            conn.execute(s.stage_leases.delete().where(s.stage_leases.c.fingerprint == fingerprint,
                                                       s.stage_leases.c.run_id == run_id))

    def stage_leases(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(s.stage_leases)).mappings()]

    def finish_sweep_trial(self, sweep_id: str, number: int, objective: float | None) -> None:
        with self._write() as conn:
            conn.execute(update(s.sweep_trials).where(s.sweep_trials.c.sweep_id == sweep_id,
                                                      s.sweep_trials.c.number == number)
                         .values(state="done", objective=objective, finished_at=time.time()))

    def heartbeat(self, run_id: str) -> bool:
        """Refresh the owner's heartbeat; False if this process no longer owns the run."""
        with self._write() as conn:
            result = conn.execute(update(s.runs).where(
                s.runs.c.run_id == run_id, s.runs.c.owner_pid == os.getpid(), s.runs.c.owner_host == HOST,
            ).values(heartbeat_at=time.time()))
            return result.rowcount == 1

    def update_run(self, run_id: str, **fields: Any) -> None:
        with self._write() as conn:
            conn.execute(update(s.runs).where(s.runs.c.run_id == run_id).values(updated_at=time.time(), **fields))

    # ------------------------------------------------------------ attempts

    def open_attempt(self, run_id: str, stage: str, *, pid: int | None = None,
                     resumed_from: str | None = None, overrides: dict[str, Any] | None = None) -> tuple[int, int]:
        """Open the next attempt of a stage; returns (attempt row id, attempt number from 1)."""
        with self._write() as conn:
            # The stage row's lock orders two openers on PostgreSQL; without it both would read the same
            # max and one would fail on (run_id, stage, attempt).
            conn.execute(select(s.stages.c.state).where(s.stages.c.run_id == run_id, s.stages.c.name == stage)
                         .with_for_update())
            last = conn.scalar(select(func.max(s.stage_attempts.c.attempt)).where(
                s.stage_attempts.c.run_id == run_id, s.stage_attempts.c.stage == stage)) or 0
            result = conn.execute(insert(s.stage_attempts).values(
                run_id=run_id, stage=stage, attempt=last + 1, outcome="running", started_at=time.time(),
                pid=pid or os.getpid(), host=HOST, resumed_from=resumed_from, overrides=overrides or {}))
            return int(result.inserted_primary_key[0]), last + 1

    def close_attempt(self, attempt_id: int, outcome: str, *, exit_code: int | None = None,
                      error: str | None = None, metrics: dict[str, Any] | None = None,
                      error_kind: str | None = None, error_traceback: str | None = None) -> None:
        with self._write() as conn:
            conn.execute(update(s.stage_attempts).where(s.stage_attempts.c.id == attempt_id).values(
                outcome=outcome, finished_at=time.time(), exit_code=exit_code, error=error, metrics=metrics,
                error_kind=error_kind, error_traceback=error_traceback))

    def record_attempt_data(self, attempt_id: int, data: dict[str, Any]) -> None:
        """What an attempt did with its datasets (prepared or reused, rows, seconds), stored in its
        metrics as it happens: an attempt killed later still shows it."""
        with self._write() as conn:
            metrics = conn.scalar(select(s.stage_attempts.c.metrics).where(s.stage_attempts.c.id == attempt_id)
                                  .with_for_update())
            conn.execute(update(s.stage_attempts).where(s.stage_attempts.c.id == attempt_id).values(
                metrics={**(metrics or {}), "data": data}))

    def set_attempt_process(self, attempt_id: int, pid: int, worker: str | None = None) -> None:
        """The attempt's process, and how it was started (`fork` from the pre-imported worker, or `spawn`)."""
        values: dict[str, Any] = {"pid": pid}
        if worker is not None:
            values["worker"] = worker
        with self._write() as conn:
            conn.execute(update(s.stage_attempts).where(s.stage_attempts.c.id == attempt_id).values(**values))

    def close_open_attempts(self, run_id: str, outcome: str, error: str) -> int:
        """Close attempts a dead owner left `running`."""
        with self._write() as conn:
            result = conn.execute(update(s.stage_attempts).where(
                s.stage_attempts.c.run_id == run_id, s.stage_attempts.c.outcome == "running",
            ).values(outcome=outcome, finished_at=time.time(), error=error))
            return result.rowcount

    # ------------------------------------------------------------ scheduler jobs

    def record_job_start(self, run_id: str, *, scheduler: str, job_id: str, restart_count: int,
                         nodes: str | None) -> int:
        """This process, started by the scheduler's job `job_id`, drives the run now; returns the row id."""
        with self._write() as conn:
            result = conn.execute(insert(s.scheduler_jobs).values(
                run_id=run_id, scheduler=scheduler, job_id=job_id, restart_count=restart_count, nodes=nodes,
                host=HOST, pid=os.getpid(), started_at=time.time()))
            return int(result.inserted_primary_key[0])

    def record_job_end(self, job_row_id: int, end_reason: str, *, requeued: bool = False) -> None:
        with self._write() as conn:
            conn.execute(update(s.scheduler_jobs).where(s.scheduler_jobs.c.id == job_row_id).values(
                ended_at=time.time(), end_reason=end_reason, requeued=requeued))

    # ------------------------------------------------------------ records

    def record_checkpoint(self, run_id: str, stage: str, attempt_id: int, step: int, path: str,
                          manifest_sha256: str | None) -> None:
        with self._write() as conn:
            conn.execute(insert(s.checkpoints).values(
                run_id=run_id, stage=stage, attempt_id=attempt_id, step=step, path=path,
                manifest_sha256=manifest_sha256, created_at=time.time()))

    def record_metrics(self, run_id: str, stage: str, attempt_id: int,
                       rows: Iterable[tuple[int, str, Any]]) -> int:
        values = []
        for step, name, value in rows:
            number, raw = _finite(value)
            values.append({"run_id": run_id, "stage": stage, "attempt_id": attempt_id, "step": int(step),
                           "name": name, "value": number, "raw": raw})
        if values:
            with self._write() as conn:
                conn.execute(insert(s.metrics), values)
        return len(values)

    def record_gate(self, run_id: str, stage: str, attempt_id: int | None, gate: str, passed: bool,
                    checks: list[dict[str, Any]]) -> int:
        """Write a gate outcome and every check's result together."""
        with self._write() as conn:
            result = conn.execute(insert(s.gate_results).values(
                run_id=run_id, stage=stage, attempt_id=attempt_id, gate=gate, passed=passed,
                created_at=time.time()))
            gate_id = int(result.inserted_primary_key[0])
            if checks:
                conn.execute(insert(s.gate_checks), [{
                    "gate_result_id": gate_id, "name": c["name"], "passed": bool(c["passed"]),
                    "severity": c.get("severity", "error"), "mode": c.get("mode", "sequential"),
                    "value": c.get("value"), "threshold": c.get("threshold"),
                    "duration_s": c.get("duration_s"), "details": c.get("details"),
                } for c in checks])
            return gate_id

    def record_artifacts(self, run_id: str, stage: str, files: Iterable[tuple[str, int, str]]) -> None:
        now = time.time()
        rows = [{"run_id": run_id, "stage": stage, "path": p, "size_bytes": n, "sha256": h, "created_at": now}
                for p, n, h in files]
        if rows:
            with self._write() as conn:
                conn.execute(insert(s.artifacts), rows)
