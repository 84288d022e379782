"""The ledger on a real SQLite file and on a real PostgreSQL database (every test that takes `db_url`
runs on both; see pytest_generate_tests): pragmas, atomic transitions, compare-and-set, migrations."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from trainpipe.engine.machine import next_state
from trainpipe.errors import IllegalTransition, RunNotFound
from trainpipe.errors import LedgerError
from trainpipe.store.ledger import HEAD, HOST, Ledger, StaleState
from trainpipe.store.reader import MIGRATION_NAMES

STAGES = ("sft", "merge", "dpo")
RELEASE_0_1_0 = Path(__file__).parent / "fixtures" / "ledger_release_0_1_0.sql"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def sqlite_only(db_url: str, why: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip(f"SQLite only: {why}")


def fsm(kind: str, trigger: str):
    return lambda current: next_state(kind, current, trigger)


def db_file(db_url: str) -> Path:
    return Path(db_url.removeprefix("sqlite:///"))


def raw_rows(db_url: str, sql: str, *params) -> list[tuple]:
    """Read through a connection of its own (plain sqlite3 for a file): what is really stored."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_file(db_url))
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    assert not params
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def raw_exec(db_url: str, *statements: str) -> None:
    """Change the database behind the ledger's back, in one transaction."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_file(db_url))
        try:
            with conn:
                for statement in statements:
                    conn.execute(statement)
        finally:
            conn.close()
        return
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def make_run(ledger: Ledger, run_id: str = "run-1", tmp: Path | None = None) -> str:
    base = str(tmp or "/nonexistent")
    ledger.create_run(run_id=run_id, pipeline_id="pipe", config_snapshot={"pipeline_id": "pipe", "seed": 1},
                      config_path=None, output_dir=base, run_dir=f"{base}/{run_id}", stages=STAGES)
    return run_id


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def ledger(db_url: str):
    ledger = Ledger(db_url)
    yield ledger
    ledger.close()


# ------------------------------------------------------------------ the file and its pragmas


def test_uses_the_env_db_by_default(db_url: str) -> None:
    assert os.environ["TRAINPIPE_DB"] == db_url
    ledger = Ledger()
    try:
        assert ledger.url == db_url
        make_run(ledger)
    finally:
        ledger.close()
    assert not db_url.startswith("sqlite") or db_file(db_url).is_file()
    assert raw_rows(db_url, "SELECT run_id FROM runs") == [("run-1",)]


def test_pragmas_in_effect(ledger: Ledger, db_url: str) -> None:
    sqlite_only(db_url, "PRAGMAs; PostgreSQL's durability and locking are the server's")
    with ledger._engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("synchronous") == 2  # FULL
        assert pragma("busy_timeout") > 0


def test_wal_mode_persists_in_the_file(ledger: Ledger, db_url: str) -> None:
    sqlite_only(db_url, "journal_mode=WAL is a SQLite file's setting")
    assert raw_rows(db_url, "PRAGMA journal_mode") == [("wal",)]


def test_foreign_keys_are_enforced(ledger: Ledger) -> None:
    with pytest.raises(IntegrityError):
        ledger.record_metrics("no-such-run", "sft", None, [(1, "loss", 1.0)])
    with pytest.raises(IntegrityError):
        ledger.record_artifacts("no-such-run", "sft", [("x", 1, "0" * 64)])


def test_integrity_check(ledger: Ledger, db_url: str) -> None:
    sqlite_only(db_url, "PRAGMA integrity_check")
    make_run(ledger)
    assert ledger.integrity_check() == "ok"


# ------------------------------------------------------------------ migrations


def alembic_version(db_url: str) -> list[tuple]:
    return raw_rows(db_url, "SELECT version_num FROM alembic_version")


def test_migrations_rerun_safely(db_url: str) -> None:
    first = Ledger(db_url)
    make_run(first)
    first.close()

    second = Ledger(db_url)
    third = Ledger(db_url)
    try:
        assert second.count_runs() == 1
        assert third.get_run("run-1")["state"] == "pending"
    finally:
        second.close()
        third.close()
    assert alembic_version(db_url) == [(HEAD,)]
    # Only the marker that tells trainpipe 0.1.0 (which reads this table alone) to keep out.
    assert raw_rows(db_url, "SELECT name FROM schema_migrations") == [("alembic",)]


def test_head_is_the_alembic_script_directorys_head() -> None:
    """reader.HEAD lets `status` decide without importing Alembic; it must be Alembic's own answer."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from trainpipe.store.ledger import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(config)
    assert script.get_heads() == [HEAD]
    assert tuple(r.revision for r in reversed(list(script.walk_revisions()))) == MIGRATION_NAMES


def test_migrations_0003_0004_upgrade_a_0002_ledger(db_url: str) -> None:
    """A ledger from before the lookup indexes and the attempt's worker column gains both."""
    ledger = Ledger(db_url)
    make_run(ledger)
    ledger.close()
    raw_exec(db_url, "DROP INDEX ix_gate_results_run", "DROP INDEX ix_gate_checks_gate", "DROP INDEX ix_checkpoints_run",
             "DROP INDEX ix_artifacts_run", "ALTER TABLE stage_attempts DROP COLUMN worker",
             "UPDATE alembic_version SET version_num = '0002_error_kinds'")

    ledger = Ledger(db_url)
    try:
        attempt_id, _ = ledger.open_attempt("run-1", "sft")
        ledger.set_attempt_process(attempt_id, 4242, "fork")
        assert [(a["pid"], a["worker"]) for a in ledger.attempts("run-1")] == [(4242, "fork")]
        assert ledger.get_run("run-1")["state"] == "pending"
        from sqlalchemy import inspect

        indexes = {i["name"] for table in ("gate_results", "gate_checks", "checkpoints", "artifacts")
                   for i in inspect(ledger._engine).get_indexes(table)}
    finally:
        ledger.close()
    assert {"ix_gate_results_run", "ix_gate_checks_gate", "ix_checkpoints_run", "ix_artifacts_run"} <= indexes
    assert alembic_version(db_url) == [(HEAD,)]


def test_migration_0002_upgrades_a_0001_ledger_in_place(db_url: str) -> None:
    """A ledger written before error kinds existed gains the columns and keeps its rows."""
    ledger = Ledger(db_url)
    make_run(ledger)
    ledger.close()
    raw_exec(db_url, *[f"ALTER TABLE {table} DROP COLUMN {column}" for table in ("runs", "stage_attempts")
                       for column in ("error_kind", "error_traceback")],
             "UPDATE alembic_version SET version_num = '0001_initial'")

    upgraded = Ledger(db_url)
    try:
        assert upgraded.get_run("run-1")["error_kind"] is None
        upgraded.update_run("run-1", error_kind="user")
        assert upgraded.get_run("run-1")["error_kind"] == "user"
    finally:
        upgraded.close()
    assert alembic_version(db_url) == [(HEAD,)]


def test_a_ledger_from_a_newer_trainpipe_is_refused_and_left_alone(db_url: str) -> None:
    ledger = Ledger(db_url)
    make_run(ledger)
    ledger.close()
    raw_exec(db_url, "UPDATE alembic_version SET version_num = '0099_from_the_future'")
    before = _snapshot(db_url)

    with pytest.raises(LedgerError) as info:
        Ledger(db_url)
    assert "was created by a newer trainpipe" in info.value.message and "0099_from_the_future" in info.value.message
    assert _snapshot(db_url) == before
    assert alembic_version(db_url) == [("0099_from_the_future",)]


def load_release_ledger(path: Path, *statements: str) -> str:
    """The ledger trainpipe 0.1.0 (the pre-Alembic runner, schema_migrations only) left, from its dump."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(RELEASE_0_1_0.read_text())
        with conn:
            for statement in statements:
                conn.execute(statement)
    finally:
        conn.close()
    return f"sqlite:///{path}"


def test_a_ledger_made_by_release_0_1_0_is_upgraded_on_open(tmp_path: Path) -> None:
    url = load_release_ledger(tmp_path / "release.db")
    assert "alembic_version" not in {n for (n,) in raw_rows(url, "SELECT name FROM sqlite_master")}

    ledger = Ledger(url)
    try:
        run = ledger.get_run("release-run")
        assert (run["state"], run["pipeline_id"]) == ("interrupted", "quickstart")
        assert run["config_snapshot"] == {"pipeline_id": "quickstart", "seed": 42, "sft": {"max_steps": 12}}
        assert run["cache_policy"] == {"use_cache": True, "from_stage": None}
        assert [(t["stage"], t["trigger"], t["to_state"]) for t in ledger.transitions("release-run")] == [
            (None, "create", "pending"), (None, "start", "running"), ("sft", "start", "running"),
            ("sft", "validate", "validating"), ("sft", "pass_gate", "passed"), (None, "interrupt", "interrupted")]
        assert [(s["name"], s["state"]) for s in ledger.stages("release-run")] == [
            ("sft", "passed"), ("merge", "pending"), ("dpo", "pending")]
        (attempt,) = ledger.attempts("release-run")
        assert (attempt["outcome"], attempt["worker"], attempt["overrides"]) == ("passed", "fork", {"batch_size": 4})
        (gate,) = ledger.gates("release-run")
        assert gate["passed"] is True
        assert [(c["name"], c["value"]) for c in gate["checks"]] == [
            ("loss_below_max", 1.75), ("output_format_valid", {"share": 0.25})]
        assert [m["value"] for m in ledger.metrics("release-run")] == [2.5, 1.75]
        # ... and it takes this version's writes.
        ledger.transition_run("release-run", "resume", fsm("run", "resume"), set_owner=True)
    finally:
        ledger.close()
    assert alembic_version(url) == [(HEAD,)]
    # The release recorded its seven steps there; Alembic adds only its marker (later steps are in alembic_version).
    assert raw_rows(url, "SELECT name FROM schema_migrations ORDER BY name") == [
        (n,) for n in MIGRATION_NAMES[:7]] + [("alembic",)]

    from helpers import cli_json

    from trainpipe.store.opening import open_for_reading
    from trainpipe.store.reader import LedgerReader

    # Now at head, `status` reads it through the light reader.
    assert type(open_for_reading(url)) is LedgerReader
    rows = cli_json("status", "--all", "--db", url)
    assert [(r["run_id"], r["state"]) for r in rows] == [("release-run", "running")]


def test_a_0_1_0_ledger_before_0007_gains_the_lineage_column(tmp_path: Path) -> None:
    url = load_release_ledger(tmp_path / "release.db", "ALTER TABLE runs DROP COLUMN lineage",
                              "DELETE FROM schema_migrations WHERE name = '0007_lineage'")
    from helpers import cli_json

    # `status` is what a user runs first after upgrading: it migrates too.
    rows = cli_json("status", "--all", "--db", url)
    assert [(r["run_id"], r["state"]) for r in rows] == [("release-run", "interrupted")]
    assert alembic_version(url) == [(HEAD,)]
    assert "lineage" in {r[1] for r in raw_rows(url, "PRAGMA table_info(runs)")}
    ledger = Ledger(url)
    try:
        ledger.update_run("release-run", lineage={"seed": 42})
        assert ledger.get_run("release-run")["lineage"] == {"seed": 42}
    finally:
        ledger.close()


def test_a_damaged_0_1_0_ledger_is_refused_and_not_stamped(tmp_path: Path) -> None:
    """Every step recorded but a column gone: the upgrade's transaction rolls back, stamp included."""
    url = load_release_ledger(tmp_path / "release.db", "ALTER TABLE runs DROP COLUMN lineage")
    before = raw_rows(url, "SELECT * FROM sqlite_master")

    with pytest.raises(LedgerError) as info:
        Ledger(url)
    assert "is damaged: table runs lacks lineage" in info.value.message
    assert raw_rows(url, "SELECT * FROM sqlite_master") == before
    assert raw_rows(url, "SELECT COUNT(*) FROM schema_migrations WHERE name = 'alembic'") == [(0,)]


def test_a_0_1_0_ledger_with_an_unknown_step_is_refused(tmp_path: Path) -> None:
    url = load_release_ledger(tmp_path / "release.db",
                              "INSERT INTO schema_migrations (name, applied_at) VALUES ('0008_future', 0)")
    with pytest.raises(LedgerError) as info:
        Ledger(url)
    assert "was created by a newer trainpipe" in info.value.message and "0008_future" in info.value.message
    assert "alembic_version" not in {n for (n,) in raw_rows(url, "SELECT name FROM sqlite_master")}


def test_opening_a_ledger_at_head_does_not_import_alembic(db_url: str) -> None:
    Ledger(db_url).close()
    code = ("import sys; from trainpipe.store.ledger import Ledger; "
            f"Ledger({db_url!r}).close(); assert 'alembic' not in sys.modules, 'alembic imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stdlib_reads_return_what_sqlalchemy_reads_return(ledger: Ledger, db_url: str) -> None:
    """A SQLite file is read through the stdlib sqlite3 module (store/reader.py); any other URL,
    here the same file with a query option, through SQLAlchemy. Both must decode rows alike."""
    sqlite_only(db_url, "compares the stdlib sqlite3 reader with SQLAlchemy on one file")
    run_id = make_run(ledger)
    attempt_id, _ = ledger.open_attempt(run_id, "sft", overrides={"batch_size": 4})
    ledger.close_attempt(attempt_id, "passed", metrics={"final_loss": 0.5, "nested": [1, 2]})
    ledger.record_gate(run_id, "sft", attempt_id, "gate1", False, [
        {"name": "a", "passed": False, "value": {"share": 0.25}, "threshold": ">= 0.7"},
        {"name": "b", "passed": True, "value": None, "threshold": 3},
        {"name": "c", "passed": True, "value": 0.5, "threshold": "0.5"}])
    ledger.record_metrics(run_id, "sft", attempt_id, [(1, "loss", 1.5), (2, "loss", float("nan"))])
    ledger.record_checkpoint(run_id, "sft", attempt_id, 5, "/x/checkpoint-5", "0" * 64)
    ledger.record_artifacts(run_id, "sft", [("/x/adapter.safetensors", 10, "f" * 64)])
    through_sqlalchemy = Ledger(db_url + "?timeout=30")
    try:
        assert through_sqlalchemy._file is None and ledger._file is not None
        for read in (lambda lg: lg.get_run(run_id), lambda lg: lg.list_runs(), lambda lg: lg.stages(run_id),
                     lambda lg: lg.attempts(run_id), lambda lg: lg.attempts(run_id, "sft"),
                     lambda lg: lg.gates(run_id), lambda lg: lg.metrics(run_id, "sft"),
                     lambda lg: lg.checkpoints(run_id), lambda lg: lg.artifacts(run_id),
                     lambda lg: lg.transitions(run_id), lambda lg: lg.stage_progress([run_id]),
                     lambda lg: lg.count_runs()):
            assert read(ledger) == read(through_sqlalchemy)
    finally:
        through_sqlalchemy.close()

    (attempt,) = ledger.attempts(run_id)
    assert attempt["overrides"] == {"batch_size": 4}
    assert attempt["metrics"] == {"final_loss": 0.5, "nested": [1, 2]}
    (gate,) = ledger.gates(run_id)
    assert gate["passed"] is False
    assert [(c["passed"], c["value"], c["threshold"]) for c in gate["checks"]] == [
        (False, {"share": 0.25}, ">= 0.7"), (True, None, 3), (True, 0.5, "0.5")]
    assert ledger.get_run(run_id)["config_snapshot"] == {"pipeline_id": "pipe", "seed": 1}
    assert [(m["value"], m["raw"]) for m in ledger.metrics(run_id)] == [(1.5, None), (None, "nan")]


def test_the_stdlib_reader_decodes_every_json_and_boolean_column_of_the_schema() -> None:
    from sqlalchemy import JSON, Boolean

    from trainpipe.store import reader, schema

    columns = [c for table in schema.metadata.tables.values() for c in table.columns]
    assert reader._JSON_COLUMNS == {c.name for c in columns if isinstance(c.type, JSON)}
    assert reader._BOOL_COLUMNS == {c.name for c in columns if isinstance(c.type, Boolean)}


def test_a_migrated_sqlite_ledger_is_opened_for_reading_without_sqlalchemy(ledger: Ledger, db_url: str,
                                                                           tmp_path: Path) -> None:
    sqlite_only(db_url, "the stdlib sqlite3 reader")
    from trainpipe.store.opening import open_for_reading
    from trainpipe.store.reader import LedgerReader

    make_run(ledger)
    reader = open_for_reading(db_url)
    assert type(reader) is LedgerReader
    assert reader.get_run("run-1")["state"] == "pending"
    # A file that does not exist yet, or a URL sqlite3 cannot take as is, gets the full Ledger.
    fresh = open_for_reading(f"sqlite:///{tmp_path / 'new' / 'ledger.db'}")
    assert isinstance(fresh, Ledger) and fresh.count_runs() == 0
    fresh.close()


def test_schema_has_the_ledger_tables(ledger: Ledger) -> None:
    from sqlalchemy import inspect

    tables = set(inspect(ledger._engine).get_table_names())
    assert {"runs", "stages", "stage_attempts", "transitions", "checkpoints", "gate_results", "gate_checks",
            "metrics", "artifacts", "schema_migrations", "alembic_version"} <= tables


# ------------------------------------------------------------------ create_run


def test_create_run_writes_pending_run_stages_and_one_transition(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)

    assert raw_rows(db_url, "SELECT run_id, pipeline_id, state, owner_pid, finished_at FROM runs") == [
        ("run-1", "pipe", "pending", None, None)]
    assert raw_rows(db_url, "SELECT name, position, state FROM stages WHERE run_id='run-1' ORDER BY position") == [
        ("sft", 0, "pending"), ("merge", 1, "pending"), ("dpo", 2, "pending")]
    assert raw_rows(db_url, "SELECT stage, from_state, to_state, trigger, pid, host FROM transitions") == [
        (None, None, "pending", "create", os.getpid(), socket.gethostname())]
    assert ledger.get_run("run-1")["config_snapshot"] == {"pipeline_id": "pipe", "seed": 1}
    assert ledger.count_runs() == 1


def test_create_run_twice_with_one_id_fails_and_keeps_one_run(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    with pytest.raises(IntegrityError):
        make_run(ledger)
    assert ledger.count_runs() == 1
    assert raw_rows(db_url, "SELECT COUNT(*) FROM transitions") == [(1,)]


def test_get_run_unknown_id(ledger: Ledger) -> None:
    with pytest.raises(RunNotFound) as info:
        ledger.get_run("nope")
    assert info.value.message == "no run with id 'nope'"
    assert info.value.exit_code == 2


# ------------------------------------------------------------------ transitions


def test_transition_run_appends_exactly_one_row(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)

    assert ledger.transition_run("run-1", "start", fsm("run", "start"), set_owner=True,
                                 detail={"why": "test"}) == "running"

    run = ledger.get_run("run-1")
    assert run["state"] == "running"
    assert (run["owner_pid"], run["owner_host"]) == (os.getpid(), HOST)
    assert run["heartbeat_at"] is not None
    assert run["finished_at"] is None
    rows = raw_rows(db_url, "SELECT stage, from_state, to_state, trigger, pid, host FROM transitions ORDER BY id")
    assert rows == [(None, None, "pending", "create", os.getpid(), HOST),
                    (None, "pending", "running", "start", os.getpid(), HOST)]
    assert ledger.transitions("run-1")[-1]["detail"] == {"why": "test"}


def test_transition_run_to_a_final_state_sets_finished_at_and_clears_owner(ledger: Ledger) -> None:
    make_run(ledger)
    ledger.transition_run("run-1", "start", fsm("run", "start"), set_owner=True)
    ledger.transition_run("run-1", "succeed", fsm("run", "succeed"), clear_owner=True,
                          final_model_path="/models/final")

    run = ledger.get_run("run-1")
    assert run["state"] == "succeeded"
    assert run["finished_at"] is not None
    assert run["owner_pid"] is None and run["owner_host"] is None
    assert run["final_model_path"] == "/models/final"
    assert [t["trigger"] for t in ledger.transitions("run-1")] == ["create", "start", "succeed"]


def test_transition_stage_appends_exactly_one_row(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)

    assert ledger.transition_stage("run-1", "sft", "start", fsm("stage", "start")) == "running"

    assert [s["state"] for s in ledger.stages("run-1")] == ["running", "pending", "pending"]
    assert ledger.get_run("run-1")["current_stage"] == "sft"
    rows = raw_rows(db_url, "SELECT stage, from_state, to_state, trigger, pid, host FROM transitions "
                            "WHERE stage IS NOT NULL")
    assert rows == [("sft", "pending", "running", "start", os.getpid(), HOST)]

    ledger.transition_stage("run-1", "sft", "validate", fsm("stage", "validate"))
    ledger.transition_stage("run-1", "sft", "pass_gate", fsm("stage", "pass_gate"), output_path="/out/sft")
    sft = ledger.stages("run-1")[0]
    assert (sft["state"], sft["output_path"]) == ("passed", "/out/sft")
    assert raw_rows(db_url, "SELECT COUNT(*) FROM transitions WHERE stage='sft'") == [(3,)]


def _snapshot(db_url: str) -> tuple:
    return (raw_rows(db_url, "SELECT * FROM runs"), raw_rows(db_url, "SELECT * FROM stages ORDER BY position"),
            raw_rows(db_url, "SELECT * FROM transitions ORDER BY id"))


def test_illegal_run_trigger_changes_nothing(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    before = _snapshot(db_url)

    with pytest.raises(IllegalTransition):
        ledger.transition_run("run-1", "resume", fsm("run", "resume"), set_owner=True, error="x")

    assert _snapshot(db_url) == before
    assert ledger.get_run("run-1")["state"] == "pending"


def test_illegal_stage_trigger_changes_nothing(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    before = _snapshot(db_url)

    with pytest.raises(IllegalTransition):
        ledger.transition_stage("run-1", "sft", "pass_gate", fsm("stage", "pass_gate"), output_path="/x")

    assert _snapshot(db_url) == before


def test_resolver_error_after_read_rolls_back(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    before = _snapshot(db_url)

    def boom(current: str) -> str:
        assert current == "pending"
        raise RuntimeError("resolver failed")

    with pytest.raises(RuntimeError):
        ledger.transition_run("run-1", "start", boom, set_owner=True)
    assert _snapshot(db_url) == before


def test_transition_of_unknown_run_or_stage(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    with pytest.raises(RunNotFound):
        ledger.transition_run("nope", "start", fsm("run", "start"))
    with pytest.raises(RunNotFound):
        ledger.transition_stage("run-1", "eval", "start", fsm("stage", "start"))
    assert raw_rows(db_url, "SELECT COUNT(*) FROM transitions") == [(1,)]


def test_expect_state_compare_and_set(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    before = _snapshot(db_url)

    with pytest.raises(StaleState) as info:
        ledger.transition_run("run-1", "interrupt", fsm("run", "interrupt"), expect_state="running",
                              clear_owner=True)
    assert info.value.message == "run run-1 is pending, not running"
    assert _snapshot(db_url) == before

    # the same call from the state it expects goes through
    ledger.transition_run("run-1", "start", fsm("run", "start"), expect_state="pending")
    assert ledger.get_run("run-1")["state"] == "running"


def test_second_compare_and_set_on_same_state_loses(db_url: str) -> None:
    first, second = Ledger(db_url), Ledger(db_url)
    try:
        make_run(first)
        first.transition_run("run-1", "start", fsm("run", "start"))
        # both observed `running`; only one may act on it
        first.transition_run("run-1", "interrupt", fsm("run", "interrupt"), expect_state="running")
        with pytest.raises(StaleState):
            second.transition_run("run-1", "interrupt", fsm("run", "interrupt"), expect_state="running")
    finally:
        first.close()
        second.close()
    assert raw_rows(db_url, "SELECT COUNT(*) FROM transitions WHERE trigger='interrupt'") == [(1,)]


def test_two_ledgers_on_one_file_see_each_others_writes(db_url: str) -> None:
    a, b = Ledger(db_url), Ledger(db_url)
    try:
        make_run(a, "run-a")
        assert b.get_run("run-a")["state"] == "pending"
        b.transition_run("run-a", "start", fsm("run", "start"))
        assert a.get_run("run-a")["state"] == "running"
        make_run(b, "run-b")
        assert {r["run_id"] for r in a.list_runs()} == {"run-a", "run-b"}
        assert a.count_runs() == b.count_runs() == 2
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ heartbeat and owners


def test_heartbeat_true_for_owner_false_for_another_pid(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    assert ledger.heartbeat("run-1") is False  # nobody owns a pending run
    ledger.transition_run("run-1", "start", fsm("run", "start"), set_owner=True)
    assert ledger.heartbeat("run-1") is True

    other = dead_pid()
    ledger.update_run("run-1", owner_pid=other)
    beat_before = ledger.get_run("run-1")["heartbeat_at"]

    assert ledger.heartbeat("run-1") is False
    assert ledger.get_run("run-1")["heartbeat_at"] == beat_before
    assert raw_rows(db_url, "SELECT owner_pid FROM runs") == [(other,)]


def test_heartbeat_false_for_same_pid_on_another_host(ledger: Ledger) -> None:
    make_run(ledger)
    ledger.transition_run("run-1", "start", fsm("run", "start"), set_owner=True)
    ledger.update_run("run-1", owner_host=HOST + "-elsewhere")
    assert ledger.heartbeat("run-1") is False


# ------------------------------------------------------------------ attempts, metrics, gates


def test_attempts_number_from_one_per_stage(ledger: Ledger) -> None:
    make_run(ledger)
    first_id, first = ledger.open_attempt("run-1", "sft")
    second_id, second = ledger.open_attempt("run-1", "sft", resumed_from="/ckpt/4", overrides={"batch_size": 2})
    _, dpo = ledger.open_attempt("run-1", "dpo")
    assert (first, second, dpo) == (1, 2, 1)

    ledger.close_attempt(first_id, "failed", exit_code=1, error="boom")
    assert ledger.close_open_attempts("run-1", "interrupted", "owner died") == 2

    rows = {(a["stage"], a["attempt"]): a for a in ledger.attempts("run-1")}
    assert (rows["sft", 1]["outcome"], rows["sft", 1]["exit_code"], rows["sft", 1]["error"]) == ("failed", 1, "boom")
    assert (rows["sft", 2]["outcome"], rows["sft", 2]["error"]) == ("interrupted", "owner died")
    assert rows["sft", 2]["overrides"] == {"batch_size": 2}
    assert rows["sft", 2]["resumed_from"] == "/ckpt/4"
    assert second_id != first_id


def test_nan_metric_stored_as_null_with_raw(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    attempt_id, _ = ledger.open_attempt("run-1", "sft")

    assert ledger.record_metrics("run-1", "sft", attempt_id, [
        (1, "loss", float("nan")), (2, "loss", 0.5), (3, "loss", float("inf")), (4, "loss", "oops")]) == 4

    assert raw_rows(db_url, "SELECT step, name, value, raw FROM metrics ORDER BY step") == [
        (1, "loss", None, "nan"), (2, "loss", 0.5, None), (3, "loss", None, "inf"), (4, "loss", None, "oops")]
    assert [m["raw"] for m in ledger.metrics("run-1", "sft")] == ["nan", None, "inf", "oops"]


def test_record_gate_stores_every_check(ledger: Ledger, db_url: str) -> None:
    make_run(ledger)
    attempt_id, _ = ledger.open_attempt("run-1", "sft")

    gate_id = ledger.record_gate("run-1", "sft", attempt_id, "gate1", False, [
        {"name": "loss_below_max", "passed": True, "value": 1.2, "threshold": 2.0, "duration_s": 0.01},
        {"name": "no_nan", "passed": False, "severity": "error", "mode": "parallel", "details": "nan at step 3"},
    ])

    assert raw_rows(db_url, "SELECT id, run_id, stage, attempt_id, gate, passed FROM gate_results") == [
        (gate_id, "run-1", "sft", attempt_id, "gate1", 0)]
    assert raw_rows(db_url, "SELECT gate_result_id, name, passed, severity, mode, details FROM gate_checks "
                            "ORDER BY id") == [
        (gate_id, "loss_below_max", 1, "error", "sequential", None),
        (gate_id, "no_nan", 0, "error", "parallel", "nan at step 3")]
    [gate] = ledger.gates("run-1")
    assert gate["passed"] is False
    assert [(c["name"], c["value"], c["threshold"]) for c in gate["checks"]] == [
        ("loss_below_max", 1.2, 2.0), ("no_nan", None, None)]


def test_checkpoints_and_artifacts(ledger: Ledger) -> None:
    make_run(ledger)
    attempt_id, _ = ledger.open_attempt("run-1", "sft")
    ledger.record_checkpoint("run-1", "sft", attempt_id, 4, "/ckpt/4", "a" * 64)
    ledger.record_checkpoint("run-1", "sft", attempt_id, 8, "/ckpt/8", None)
    ledger.record_artifacts("run-1", "sft", [("adapter.safetensors", 123, "b" * 64)])

    assert [(c["step"], c["path"]) for c in ledger.checkpoints("run-1", "sft")] == [(4, "/ckpt/4"), (8, "/ckpt/8")]
    assert ledger.checkpoints("run-1", "dpo") == []
    assert [(a["path"], a["size_bytes"]) for a in ledger.artifacts("run-1")] == [("adapter.safetensors", 123)]


def test_stage_progress_counts_done_stages(ledger: Ledger) -> None:
    make_run(ledger, "run-1")
    make_run(ledger, "run-2")
    ledger.transition_stage("run-1", "sft", "start", fsm("stage", "start"))
    ledger.transition_stage("run-1", "sft", "validate", fsm("stage", "validate"))
    ledger.transition_stage("run-1", "sft", "pass_gate", fsm("stage", "pass_gate"))
    ledger.transition_stage("run-1", "merge", "skip", fsm("stage", "skip"))

    assert ledger.stage_progress(["run-1", "run-2"]) == {"run-1": (2, 3), "run-2": (0, 3)}
    assert ledger.stage_progress([]) == {}


def test_list_runs_filters_by_state(ledger: Ledger) -> None:
    make_run(ledger, "run-1")
    make_run(ledger, "run-2")
    ledger.transition_run("run-2", "start", fsm("run", "start"))

    assert [r["run_id"] for r in ledger.list_runs(states=["running"])] == ["run-2"]
    assert {r["run_id"] for r in ledger.list_runs(states=["pending", "running"])} == {"run-1", "run-2"}
    assert len(ledger.list_runs(limit=1)) == 1


# ------------------------------------------------------------------ checkpoints on disk vs the ledger


def _write_checkpoint(root: Path, step: int) -> Path:
    from trainpipe.checkpoints import write_manifest

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(os.urandom(256))
    write_manifest(path, step)
    return path


def test_complete_checkpoint_the_orchestrator_never_recorded_is_adopted(ledger, tmp_path):
    """The orchestrator can die after the stage wrote a manifest but before it read the event."""
    from trainpipe.engine.resume_point import adopt_unrecorded_checkpoints, newest_verified_checkpoint

    run_id = make_run(ledger, tmp=tmp_path)
    attempt_id, _ = ledger.open_attempt(run_id, "sft")
    root = tmp_path / "checkpoints"
    recorded = _write_checkpoint(root, 2)
    ledger.record_checkpoint(run_id, "sft", attempt_id, 2, str(recorded), None)
    unrecorded = _write_checkpoint(root, 4)
    half_written = root / "checkpoint-6"
    half_written.mkdir()
    (half_written / "adapter_model.safetensors").write_bytes(b"partial")
    tampered = _write_checkpoint(root, 8)
    (tampered / "adapter_model.safetensors").write_bytes(b"changed after the manifest")

    assert adopt_unrecorded_checkpoints(ledger, run_id, "sft", root) == [str(unrecorded)]
    assert newest_verified_checkpoint(ledger, run_id, "sft") == (str(unrecorded), [])
    assert sorted(r["step"] for r in ledger.checkpoints(run_id, "sft")) == [2, 4]
    # Adopting twice records nothing new.
    assert adopt_unrecorded_checkpoints(ledger, run_id, "sft", root) == []
