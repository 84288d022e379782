"""What trainpipe costs on top of the same work done by a plain TRL script (issue 10: P1, P2).

P1  `trainpipe run configs/quickstart.yaml` vs benchmarks/plain_trl.py (same model, data, settings and
    overrides), alternated ROUNDS times in this one invocation; the median of the per-round ratios.
    With --long, the same again on a workload with more epochs (>= 60 s of training).
P2  per-stage process overhead beyond the first stage: from the orchestrator opening a merge or DPO
    attempt to that attempt's code running (the `started` event), read from the ledger and the
    events files of the trainpipe runs above. With --spawn-round, one more trainpipe run with
    TRAINPIPE_WORKER=spawn gives the fresh-interpreter figure in the same invocation.
Phases  where trainpipe's wall time goes, from the ledger and the events files: CLI start-up and
    input validation, stage process start (imports), each stage's own work, gates, hashing and
    ledger writes after each stage, and the exports at the end.

    python benchmarks/overhead.py [--rounds 3] [--long] [--long-rounds 2] [--spawn-round]
                                  [--gc-freeze-baseline] [--set K=V ...]

`--set` applies to both sides (default: none, the unmodified quickstart).
`trainpipe status` at scale has its own benchmark: benchmarks/cli_startup.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETS: list[str] = []
# Enough epochs for >= 60 s of training on a 2-core box (the quickstart's SFT trains ~8-17 s there).
LONG_SETS = ["sft.epochs=80", "dpo.epochs=8", "stages.sft.timeout_minutes=60", "stages.dpo.timeout_minutes=60"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, UNIX start time, stdout) of a command that must succeed."""
    wall_start = time.time()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, wall_start, proc.stdout


def trainpipe_run(out: Path, sets: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    args = [a for s in [f"output_dir={out}", *sets] for a in ("--set", s)]
    # --no-cache: every round must train (the rounds share a ledger, so round 2 would reuse round 1).
    wall, launched, _ = timed([sys.executable, "-m", "trainpipe.cli.app", "run", "configs/quickstart.yaml",
                               "--no-cache", *args], env)
    return wall, phases(env["TRAINPIPE_DB"], launched, launched + wall)


def phases(db_url: str, launched: float, ended: float) -> dict[str, Any]:
    """Where one trainpipe run's wall time went, from its ledger rows and events files."""
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    conn.row_factory = sqlite3.Row
    run = conn.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
    attempts = conn.execute("SELECT * FROM stage_attempts WHERE run_id = ? ORDER BY id", (run["run_id"],)).fetchall()
    gate_checks = {row["stage"]: row["total"] for row in conn.execute(
        "SELECT g.stage, SUM(c.duration_s) AS total FROM gate_checks c JOIN gate_results g "
        "ON c.gate_result_id = g.id WHERE g.run_id = ? GROUP BY g.stage", (run["run_id"],))}
    conn.close()
    result: dict[str, Any] = {"cli start-up, config and dataset checks": run["created_at"] - launched,
                              "stages": {}, "workers": sorted({a["worker"] for a in attempts})}
    previous_end = run["created_at"]
    between = 0.0
    for attempt in attempts:
        work = Path(run["run_dir"]) / ".work" / attempt["stage"]
        events = [json.loads(line) for line in (work / f"events-{attempt['attempt']}.jsonl").read_text().splitlines()]
        started = next(e["time"] for e in events if e["type"] == "started")
        validating = next(e["time"] for e in events if e["type"] == "validating")
        child_done = (work / f"result-{attempt['attempt']}.json").stat().st_mtime
        between += attempt["started_at"] - previous_end
        result["stages"][attempt["stage"]] = {
            "process start": started - attempt["started_at"],
            "stage work": validating - started,
            "gate": child_done - validating,
            "gate checks (sum)": gate_checks.get(attempt["stage"], 0.0),
            "child exit, hashing + ledger": attempt["finished_at"] - child_done,
            # The Trainer's own loop, first step to last: the same figure the plain script reports,
            # so a gap here means the two sides are not doing the same training.
            "trainer loop": next((e["logs"]["train_runtime"] for e in events
                                  if e["type"] == "log" and "train_runtime" in e["logs"]), 0.0),
        }
        previous_end = attempt["finished_at"]
    result["ledger between stages"] = between
    # The pre-imported worker's imports (part of the first stage's process start): any training
    # script pays them, so real_size.py sets them apart from trainpipe's own overhead.
    from trainpipe.attempt.zygote import IMPORTS_LOGGED

    worker_log = Path(run["run_dir"]) / ".work" / "worker.log"
    logged = [float(line.split()[-2]) for line in (worker_log.read_text(encoding="utf-8").splitlines()
                                                   if worker_log.is_file() else [])
              if line.startswith(IMPORTS_LOGGED)]
    result["worker imports"] = sum(logged)
    result["exports + summary at the end"] = ended - previous_end
    return result


def compare(label: str, rounds: int, sets: list[str], work: Path, env: dict[str, str],
            frozen_baseline: bool = False) -> list[dict[str, Any]]:
    ours, plain, frozen, runs = [], [], [], []
    for i in range(rounds):
        wall, phase = trainpipe_run(work / f"{label}-tp-{i}", sets, env)
        ours.append(wall)
        runs.append(phase)
        wall, _, stdout = timed([sys.executable, "benchmarks/plain_trl.py", str(work / f"{label}-plain-{i}"), *sets], env)
        plain.append(wall)
        report = next(json.loads(line) for line in stdout.splitlines() if "plain_phases" in line)
        phase["plain"] = {**report["plain_phases"], "trainer loop": report["train_runtime"]}
        if frozen_baseline:
            wall, _, stdout = timed([sys.executable, "benchmarks/plain_trl.py", str(work / f"{label}-frozen-{i}"),
                                     *sets], {**env, "PLAIN_GC_FREEZE": "1"})
            frozen.append(wall)
            phase["plain, gc.freeze()"] = next(json.loads(line)["plain_phases"] for line in stdout.splitlines()
                                               if "plain_phases" in line)
        print(f"{label} round {i + 1}: trainpipe {ours[-1]:.1f} s, plain TRL {plain[-1]:.1f} s, "
              f"ratio {ours[-1] / plain[-1]:.3f}"
              + (f"; plain TRL with gc.freeze() {frozen[-1]:.1f} s, ratio {ours[-1] / frozen[-1]:.3f}" if frozen else "")
              + f"\n  phases: {json.dumps(_rounded(phase))}", flush=True)
    ratios = [a / b for a, b in zip(ours, plain)]
    print(f"{label}: trainpipe median {statistics.median(ours):.1f} s, plain TRL median {statistics.median(plain):.1f} s, "
          f"**median ratio {statistics.median(ratios):.3f}** (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    if frozen:
        ratios = [a / b for a, b in zip(ours, frozen)]
        print(f"{label}: plain TRL with gc.freeze() median {statistics.median(frozen):.1f} s, "
              f"**median ratio {statistics.median(ratios):.3f}** (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    return runs


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def print_phases(label: str, runs: list[dict[str, Any]]) -> None:
    def med(get) -> float:
        return statistics.median(get(r) for r in runs)

    print(f"\n{label}: where trainpipe's wall time goes (median over {len(runs)} runs; workers {runs[0]['workers']})")
    print("| phase | sft | merge | dpo |\n|---|---|---|---|")
    for phase in ("process start", "stage work", "trainer loop", "gate", "gate checks (sum)",
                  "child exit, hashing + ledger"):
        cells = [f"{med(lambda r, s=s, p=phase: r['stages'][s][p]):.2f} s" if s in runs[0]["stages"] else "-"
                 for s in ("sft", "merge", "dpo")]
        print(f"| {phase} | {' | '.join(cells)} |")
    for phase in ("cli start-up, config and dataset checks", "ledger between stages", "exports + summary at the end"):
        print(f"| {phase} | {med(lambda r, p=phase: r[p]):.2f} s (run) | | |")
    if "plain" in runs[0]:
        cells = [f"{med(lambda r, s=s: r['plain'][s]):.2f} s" for s in ("sft", "merge", "dpo")]
        print(f"| plain TRL script: the same stage (no gate) | {' | '.join(cells)} |")
        cells = [f"{med(lambda r, s=s: r['plain']['trainer loop'][s]):.2f} s" if s != "merge" else "-"
                 for s in ("sft", "merge", "dpo")]
        print(f"| plain TRL script: trainer loop | {' | '.join(cells)} |")
        print(f"| plain TRL script: its imports | {med(lambda r: r['plain']['imports']):.2f} s (run) | | |")
    p2 = [r["stages"][s]["process start"] for r in runs for s in ("merge", "dpo") if s in r["stages"]]
    print(f"P2 per-stage process start beyond the first stage ({label}): median {statistics.median(p2):.2f} s, "
          f"max {max(p2):.2f} s over {len(p2)} attempts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", action="store_true", help="also the >= 60 s training workload")
    parser.add_argument("--long-rounds", type=int, default=2)
    parser.add_argument("--spawn-round", action="store_true", help="one more run with TRAINPIPE_WORKER=spawn")
    parser.add_argument("--gc-freeze-baseline", action="store_true",
                        help="also time the plain script with gc.freeze() after its imports, as trainpipe's worker does")
    parser.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE")
    args = parser.parse_args()
    sets = DEFAULT_SETS if args.sets is None else args.sets
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; overrides: {sets}", flush=True)
    with tempfile.TemporaryDirectory(prefix="trainpipe-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}",
               "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("TRAINPIPE_CACHE", str(work / "cache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached
        # Build the tiny model once, outside the timings, so both sides start from the cache.
        subprocess.run([sys.executable, "-c", "from trainpipe.stages.tiny_model import ensure_tiny_model as e; e()"],
                       env=env, check=True, capture_output=True)
        runs = compare("quickstart", args.rounds, sets, work, env, args.gc_freeze_baseline)
        print_phases("quickstart", runs)
        if args.spawn_round:
            wall, phase = trainpipe_run(work / "spawn", sets, {**env, "TRAINPIPE_WORKER": "spawn"})
            print(f"\nTRAINPIPE_WORKER=spawn: trainpipe {wall:.1f} s")
            print_phases("quickstart, spawn", [phase])
        if args.long:
            long_runs = compare("long", args.long_rounds, [*sets, *LONG_SETS], work, env, args.gc_freeze_baseline)
            print_phases("long", long_runs)
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
