"""Soak: random SIGKILLs and resumes, then many runs on one ledger at once.

    python benchmarks/soak.py --kills 100 --concurrent 8

Part 1 starts the quickstart (shortened with --steps), SIGKILLs `trainpipe run` / `trainpipe resume`
after a random delay, resumes, and repeats until `--kills` kills have landed; each run is driven
to the end. For every kill it reports the steps redone: the last step the killed attempt reached
minus the checkpoint the next attempt resumed from, which must not exceed the checkpoint interval.
Part 2 starts `--concurrent` runs on the same ledger at once and counts "database is locked".
Afterwards: PRAGMA integrity_check, gap-free transitions, and every run `succeeded`.
Everything lives under a temporary directory (or --workdir); nothing touches ~/.trainpipe.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


# Every `run` below passes --no-cache: the runs share one ledger and config, and the soak is about
# killing and resuming training, which the stage cache would otherwise skip.
def overrides(out: Path, steps: int, interval: int) -> list[str]:
    sets = [f"output_dir={out}", f"sft.max_steps={steps}", f"dpo.max_steps={max(2, steps // 2)}",
            f"checkpoint_every_n_steps={interval}", "validation.max_loss=6.5",
            "validation.checks.output_format_valid.severity=warn", "validation.max_new_tokens=32"]
    return [arg for item in sets for arg in ("--set", item)]


def trainpipe(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY created_at")]


def run_state(db: Path, run_id: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]


def max_step_reached(run_dir: Path, stage: str, attempt: int) -> int:
    events = run_dir / ".work" / stage / f"events-{attempt}.jsonl"
    steps = [0]
    if events.is_file():
        for line in events.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # the kill can cut the last line short
            if event.get("type") in ("progress", "checkpoint"):
                steps.append(int(event.get("step", 0)))
    return max(steps)


def steps_redone(db: Path, run_id: str) -> list[dict]:
    """For each attempt that did not finish, what the next attempt of that stage had to redo."""
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(f"sqlite:///{db}")
    try:
        run_dir = Path(ledger.get_run(run_id)["run_dir"])
        found = []
        for stage in ("sft", "merge", "dpo"):
            attempts = ledger.attempts(run_id, stage)
            for killed, following in zip(attempts, attempts[1:]):
                reached = max_step_reached(run_dir, stage, killed["attempt"])
                resumed = following["resumed_from"]
                start = int(resumed.rsplit("-", 1)[1]) if resumed else 0
                found.append({"run": run_id, "stage": stage, "reached": reached, "resumed_from": start,
                              "redone": max(0, reached - start)})
        return found
    finally:
        ledger.close()


def gaps(db: Path, run_id: str) -> list[str]:
    problems, last = [], {}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT stage, from_state, to_state FROM transitions WHERE run_id = ? ORDER BY id",
                            (run_id,)).fetchall()
    for stage, from_state, to_state in rows:
        if stage in last and from_state != last[stage]:
            problems.append(f"{run_id} {stage or 'run'}: {last[stage]} then {from_state}->{to_state}")
        last[stage] = to_state
    return problems


def kill_and_resume(env: dict, db: Path, out: Path, args: argparse.Namespace, rng: random.Random) -> dict:
    kills, finished_runs, started = 0, 0, time.perf_counter()
    while kills < args.kills:
        known = set(run_ids(db)) if db.exists() else set()
        proc = trainpipe("run", str(QUICKSTART), "--no-cache", *overrides(out, args.steps, args.interval), env=env)
        run_id = None
        kills_this_run = 0
        while True:
            # After its share of kills a run is left to finish, so every run ends.
            last_chance = kills_this_run >= args.kills_per_run or kills >= args.kills
            delay = None if last_chance else rng.uniform(args.min_delay, args.max_delay)
            try:
                output, _ = proc.communicate(timeout=delay)
                if proc.returncode not in (0,):
                    raise SystemExit(f"run ended with exit {proc.returncode} without a kill:\n{output[-3000:]}")
                break
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                if run_id is None:
                    created = [r for r in run_ids(db) if r not in known] if db.exists() else []
                    if not created:
                        finished_runs -= 1  # killed before the run existed: nothing to resume
                        break
                    run_id = created[0]
                if run_state(db, run_id) == "succeeded":
                    break  # the kill landed after the run had finished
                kills += 1
                kills_this_run += 1
                print(f"  kill {kills:3d}: {run_id} after {delay:.1f} s", flush=True)
                proc = trainpipe("resume", run_id, env=env)
        finished_runs += 1
    return {"kills": kills, "runs": finished_runs, "seconds": time.perf_counter() - started}


def concurrent_runs(env: dict, out: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    procs = [trainpipe("run", str(QUICKSTART), "--no-cache", *overrides(out / f"c{i}", args.steps, args.interval), env=env)
             for i in range(args.concurrent)]
    outputs = [p.communicate()[0] for p in procs]
    locked = sum(o.count("database is locked") for o in outputs)
    return {"runs": len(procs), "exit_codes": [p.returncode for p in procs], "locked": locked,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="SFT steps (DPO gets half)")
    parser.add_argument("--interval", type=int, default=2, help="checkpoint_every_n_steps")
    parser.add_argument("--kills-per-run", type=int, default=10)
    parser.add_argument("--min-delay", type=float, default=2.0)
    parser.add_argument("--max-delay", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="trainpipe-soak-"))
    db = work / "ledger.db"
    env = {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_DB": f"sqlite:///{db}",
           "TRAINPIPE_RETRY_BACKOFF_S": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRAINPIPE_FAULT", None)
    rng = random.Random(args.seed)
    print(f"workdir {work}", flush=True)

    print(f"part 1: {args.kills} random kills (delay {args.min_delay}-{args.max_delay} s) and resumes", flush=True)
    soak = kill_and_resume(env, db, work / "soak", args, rng)
    print(f"part 2: {args.concurrent} concurrent runs on one ledger", flush=True)
    together = concurrent_runs(env, work / "concurrent", args)

    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        states = dict(conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall())
    all_runs = run_ids(db)
    problems = [p for r in all_runs for p in gaps(db, r)]
    redone = [row for r in all_runs for row in steps_redone(db, r)]
    worst = max((row["redone"] for row in redone), default=0)

    print()
    print(f"kills landed: {soak['kills']} over {soak['runs']} runs in {soak['seconds']:.0f} s")
    print(f"concurrent: {together['runs']} runs, exit codes {together['exit_codes']}, "
          f"'database is locked': {together['locked']}, {together['seconds']:.0f} s")
    print(f"PRAGMA integrity_check: {integrity}")
    print(f"run states: {states}")
    print(f"transition gaps: {len(problems)}" + (f" e.g. {problems[:3]}" if problems else ""))
    mid = [r for r in redone if r["stage"] != "merge"]
    print(f"interrupted training attempts: {len(mid)}; steps redone: max {worst}, "
          f"histogram {sorted({r['redone'] for r in mid})} (checkpoint interval {args.interval})")
    ok = (integrity == "ok" and not problems and states == {"succeeded": len(all_runs)}
          and together["locked"] == 0 and worst <= args.interval)
    print("SOAK PASSED" if ok else "SOAK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
