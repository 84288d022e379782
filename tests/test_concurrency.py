"""Eight processes write one ledger at once, on SQLite and on PostgreSQL, through the ledger's real
code paths in the order a run makes them (create, start, each stage's attempt, metrics, checkpoints,
heartbeats, gate, pass; succeed), and race for what only one may win. No lost or duplicated
transition, every state the last transition's `to_state`, and exactly one winner per race."""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
from helpers import assert_transitions_gap_free

from trainpipe.engine.machine import next_state
from trainpipe.store.ledger import Ledger, StaleState

PROCESSES = 8
STAGES = ("sft", "merge", "dpo")
STEPS = 4      # metrics and a checkpoint per step, a heartbeat between
TOGGLES = 10   # per process, on the one run they all share


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def fsm(kind: str, trigger: str):
    return lambda current: next_state(kind, current, trigger)


def toggle(current: str) -> str:
    # Whatever another process left, the legal move from it: a lost update shows as two transitions
    # from one state, which assert_transitions_gap_free catches.
    return next_state("run", current, "interrupt" if current == "running" else "resume")


def create(ledger: Ledger, run_id: str) -> None:
    ledger.create_run(run_id=run_id, pipeline_id="pipe", config_snapshot={"pipeline_id": "pipe", "seed": 1},
                      config_path=None, output_dir="/out", run_dir=f"/out/{run_id}", stages=STAGES)


def a_run(db_url: str, index: int, barrier, results) -> None:
    """One process: its own run, start to finish, then the races."""
    try:
        ledger = Ledger(db_url)
        run_id = f"run-{index}"
        barrier.wait(timeout=120)
        create(ledger, run_id)
        ledger.transition_run(run_id, "start", fsm("run", "start"), set_owner=True)
        for stage in STAGES:
            ledger.transition_stage(run_id, stage, "start", fsm("stage", "start"))
            attempt_id, number = ledger.open_attempt(run_id, stage)
            assert number == 1
            for step in range(1, STEPS + 1):
                ledger.record_metrics(run_id, stage, attempt_id, [(step, "loss", 1.0 / step)])
                ledger.record_checkpoint(run_id, stage, attempt_id, step, f"/out/{run_id}/{stage}/ckpt-{step}", None)
                assert ledger.heartbeat(run_id)
            ledger.close_attempt(attempt_id, "passed", exit_code=0, metrics={"final_loss": 1.0 / STEPS})
            ledger.transition_stage(run_id, stage, "validate", fsm("stage", "validate"))
            ledger.record_gate(run_id, stage, attempt_id, f"gate-{stage}", True,
                               [{"name": "loss_below_max", "passed": True, "value": 0.25, "threshold": 6.5}])
            ledger.transition_stage(run_id, stage, "pass_gate", fsm("stage", "pass_gate"), output_path=f"/out/{run_id}")
        ledger.transition_run(run_id, "succeed", fsm("run", "succeed"), clear_owner=True)

        barrier.wait(timeout=120)
        try:
            ledger.transition_run("cas", "interrupt", fsm("run", "interrupt"), expect_state="running")
            won_cas = True
        except StaleState:
            won_cas = False
        got_lease = ledger.acquire_stage_lease("f" * 64, "sft", run_id) is None
        attempts = [ledger.open_attempt("shared", "sft")[1] for _ in range(3)]
        for _ in range(TOGGLES):
            ledger.transition_run("shared", "toggle", toggle)
        ledger.close()
        results.put((index, None, won_cas, got_lease, attempts))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results.put((index, traceback.format_exc(), None, None, None))


def test_eight_processes_write_one_ledger_without_lost_or_duplicated_transitions(db_url: str) -> None:
    ledger = Ledger(db_url)
    for shared in ("cas", "shared"):
        create(ledger, shared)
        ledger.transition_run(shared, "start", fsm("run", "start"))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=a_run, args=(db_url, i, barrier, results)) for i in range(PROCESSES)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    errors = [error for _, error, *_ in outcomes if error]
    assert not errors, "\n".join(errors)  # no lock timeouts, deadlocks, or serialization failures
    for index in range(PROCESSES):
        run_id = f"run-{index}"
        transitions = ledger.transitions(run_id)
        assert [(t["stage"], t["trigger"]) for t in transitions if t["stage"] is None] == [
            (None, "create"), (None, "start"), (None, "succeed")]
        for stage in STAGES:
            assert [t["trigger"] for t in transitions if t["stage"] == stage] == ["start", "validate", "pass_gate"]
        assert_transitions_gap_free(ledger, run_id)
        last = {t["stage"]: t["to_state"] for t in transitions}
        assert ledger.get_run(run_id)["state"] == last[None] == "succeeded"
        assert {s["name"]: s["state"] for s in ledger.stages(run_id)} == {s: last[s] for s in STAGES}
        assert [(a["stage"], a["attempt"], a["outcome"]) for a in ledger.attempts(run_id)] == [
            (s, 1, "passed") for s in STAGES]
        assert len(ledger.metrics(run_id)) == len(ledger.checkpoints(run_id)) == len(STAGES) * STEPS
        assert [g["gate"] for g in ledger.gates(run_id)] == [f"gate-{s}" for s in STAGES]

    # Eight compare-and-sets from one observed state: exactly one went through.
    assert sum(won for _, _, won, _, _ in outcomes) == 1
    assert [t["trigger"] for t in ledger.transitions("cas")] == ["create", "start", "interrupt"]
    # One lease, one holder.
    assert sum(got for _, _, _, got, _ in outcomes) == 1
    (lease,) = ledger.stage_leases()
    assert lease["run_id"] in {f"run-{i}" for i in range(PROCESSES)}
    # Attempt numbers of one stage opened by eight processes at once: 1..24, none twice.
    numbers = sorted(n for *_, attempts in outcomes for n in attempts)
    assert numbers == list(range(1, 3 * PROCESSES + 1))
    assert sorted(a["attempt"] for a in ledger.attempts("shared")) == numbers
    # The run all eight toggled: every toggle recorded once, each starting where the previous ended.
    toggles = [t for t in ledger.transitions("shared") if t["trigger"] == "toggle"]
    assert len(toggles) == PROCESSES * TOGGLES
    assert_transitions_gap_free(ledger, "shared")
    assert ledger.get_run("shared")["state"] == toggles[-1]["to_state"]
    ledger.close()


def open_ledger(db_url: str, barrier, results) -> None:
    """Open the ledger; report (error or None, the migration steps this process ran). The steps come
    from Alembic's own log ("Running upgrade A -> B"), not from trainpipe."""
    import logging

    class Steps(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.ran: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Running upgrade"):
                self.ran.append(record.getMessage())

    steps = Steps()
    alembic_log = logging.getLogger("alembic.runtime.migration")
    alembic_log.setLevel(logging.INFO)
    alembic_log.addHandler(steps)
    try:
        barrier.wait(timeout=120)
        Ledger(db_url).close()
        results.put((None, steps.ran))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results.put((traceback.format_exc(), steps.ran))


def test_processes_opening_a_new_ledger_at_once_migrate_it_once(db_url: str) -> None:
    """The first open creates the schema; of four at once, one migrates and the others find it done
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock, and DDL inside the transaction)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=open_ledger, args=(db_url, barrier, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [error for error, _steps in reports if error]
    assert not errors, "\n".join(errors)
    # Exactly one process ran the migrations, every step once; the other three ran none.
    from trainpipe.store.reader import MIGRATION_NAMES

    ran = sorted((steps for _error, steps in reports), key=len)
    assert [len(steps) for steps in ran] == [0, 0, 0, len(MIGRATION_NAMES)], ran

    from sqlalchemy import create_engine

    from trainpipe.store.reader import HEAD

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [(HEAD,)]
            assert conn.exec_driver_sql("SELECT name FROM schema_migrations").all() == [("alembic",)]
    finally:
        engine.dispose()
