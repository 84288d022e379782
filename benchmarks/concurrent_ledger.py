"""8 concurrent `trainpipe run`s on one ledger: PostgreSQL vs SQLite, in one invocation.

    python benchmarks/concurrent_ledger.py [--runs 8] [--steps 4] [--pg-url postgresql+psycopg://...]

Each backend gets a fresh ledger (a new SQLite file; a new database on the server) and `--runs` real
runs of the quickstart, shortened (`--steps` SFT steps, half as many DPO steps; the gates still run),
started together with --no-cache (they share a config, and the stage cache would let all but one skip
training). Reported per backend: wall time until the last run exits, the lock and serialization
errors in the runs' output ("database is locked", "could not serialize", "deadlock detected", "lock
timeout"), and the ledger afterwards: every run succeeded, transitions gap-free, and every run's and
stage's state its last transition's `to_state`. Exits 1 if any of that fails or an error was counted.
Without --pg-url (or TRAINPIPE_TEST_PG_URL) it starts a throwaway server with .ci/start-postgres.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
LOCK_ERRORS = ("database is locked", "could not serialize", "deadlock detected", "lock timeout",
               "SerializationFailure", "DeadlockDetected", "LockNotAvailable")


def sets(out: Path, steps: int) -> list[str]:
    items = [f"output_dir={out}", f"sft.max_steps={steps}", f"dpo.max_steps={max(2, steps // 2)}",
             f"checkpoint_every_n_steps={max(1, steps // 2)}", "validation.max_loss=6.5",
             "validation.checks.output_format_valid.severity=warn",
             "validation.checks.loss_went_down.severity=warn", "validation.max_new_tokens=32"]
    return [arg for item in items for arg in ("--set", item)]


def concurrent_runs(db: str, work: Path, runs: int, steps: int, env: dict) -> dict:
    # Create (and migrate) the ledger first, so the timing is the runs', not one-off schema setup.
    from trainpipe.store.ledger import Ledger

    Ledger(db).close()
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), "--no-cache",
                               "--db", db, *sets(work / f"run{i}", steps)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(runs)]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - started
    errors = sum(o.count(needle) for o in outputs for needle in LOCK_ERRORS)
    return {"seconds": seconds, "exit_codes": [p.returncode for p in procs], "lock_errors": errors,
            "problems": check_ledger(db, runs), "outputs": outputs}


def check_ledger(db: str, runs: int) -> list[str]:
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(db)
    problems: list[str] = []
    try:
        listed = ledger.list_runs(limit=None)
        if len(listed) != runs:
            problems.append(f"{len(listed)} runs in the ledger, expected {runs}")
        for run in listed:
            run_id = run["run_id"]
            if run["state"] != "succeeded":
                problems.append(f"{run_id}: {run['state']}")
            last: dict = {}
            for t in ledger.transitions(run_id):
                if t["stage"] in last and t["from_state"] != last[t["stage"]]:
                    problems.append(f"{run_id} {t['stage'] or 'run'}: {last[t['stage']]} then "
                                    f"{t['from_state']}->{t['to_state']}")
                last[t["stage"]] = t["to_state"]
            if last.get(None) != run["state"]:
                problems.append(f"{run_id}: state {run['state']}, last transition to {last.get(None)}")
            for stage in ledger.stages(run_id):
                if last.get(stage["name"], "pending") != stage["state"]:
                    problems.append(f"{run_id} {stage['name']}: state {stage['state']}, "
                                    f"last transition to {last.get(stage['name'])}")
    finally:
        ledger.close()
    return problems


def pg_database(server: str) -> tuple[str, Callable[[], None]]:
    from sqlalchemy import create_engine, make_url

    name = f"tp_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()

    return make_url(server).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="SFT steps (DPO gets half, at least 2)")
    parser.add_argument("--pg-url", default=os.environ.get("TRAINPIPE_TEST_PG_URL"),
                        help="a PostgreSQL server to create a database on; default: start one")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="trainpipe-concurrent-"))
    env = {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_RETRY_BACKOFF_S": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRAINPIPE_FAULT", None)
    server_dir = None
    if not args.pg_url:
        started = subprocess.run([str(ROOT / ".ci" / "start-postgres"), "--env"], check=True,
                                 capture_output=True, text=True).stdout
        values = dict(part.split("=", 1) for part in started.removeprefix("export ").split())
        args.pg_url, server_dir = values["TRAINPIPE_TEST_PG_URL"].strip("'"), values["TRAINPIPE_TEST_PG_DIR"].strip("'")
    print(f"workdir {work}; {args.runs} concurrent runs per backend, sft.max_steps={args.steps}", flush=True)

    results = {}
    pg_url, drop = pg_database(args.pg_url)
    try:
        for name, db in (("postgresql", pg_url), ("sqlite", f"sqlite:///{work / 'ledger.db'}")):
            print(f"{name}: running ...", flush=True)
            results[name] = concurrent_runs(db, work / name, args.runs, args.steps, env)
    finally:
        drop()
        if server_dir:
            subprocess.run([str(ROOT / ".ci" / "start-postgres"), "--stop", server_dir], check=False)

    print("\n| ledger | runs | wall time | lock/serialization errors | all exit 0 | ledger checks |")
    print("|---|---|---|---|---|---|")
    failed = False
    for name, r in results.items():
        ok_exit = all(code == 0 for code in r["exit_codes"])
        failed |= bool(r["lock_errors"] or r["problems"] or not ok_exit)
        print(f"| {name} | {args.runs} | {r['seconds']:.0f} s | {r['lock_errors']} | "
              f"{'yes' if ok_exit else r['exit_codes']} | {'ok' if not r['problems'] else len(r['problems'])} |")
    for name, r in results.items():
        for problem in r["problems"]:
            print(f"{name}: {problem}")
        for code, output in zip(r["exit_codes"], r["outputs"]):
            if code != 0:
                print(f"--- {name}: a run exited {code}:\n{output[-3000:]}")
    print("CONCURRENT LEDGER FAILED" if failed else "CONCURRENT LEDGER PASSED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
