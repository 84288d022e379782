"""`trainpipe status` and `inspect` wall time on a large ledger (issue 10, target P6: <= 0.3 s).

Seeds a real SQLite ledger, created and migrated by `Ledger`, then bulk-inserted through the same
SQLAlchemy tables: RUNS runs (3 stages, 3 attempts, 3 gates with 13 checks, 4 checkpoints and 6
artifacts each) and TRANSITIONS transitions spread over them. Then times each command as a real
subprocess, `python -m trainpipe.cli.app ...`, the median of --repeat invocations, next to
`python -c pass` measured in the same invocation.

    python benchmarks/cli_startup.py [--runs 10000] [--transitions 100000] [--repeat 7] [--db PATH]

With --db PATH the ledger is kept (and reused if it already exists), which makes it easy to profile:
`TRAINPIPE_DB=sqlite:///PATH python -X importtime -m trainpipe.cli.app status`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3
STAGES = ("sft", "merge", "dpo")
# What a real gate table holds, so `inspect` renders as much as it does for a real run.
GATE_CHECKS = {
    "sft": ["adapter_files_exist", "adapter_loads", "loss_below_max", "no_nan", "loss_went_down"],
    "merge": ["merged_model_loads", "size_ok", "tokenizer_ok", "merge_equivalence"],
    "dpo": ["alignment_ok", "dpo_step0_sanity", "output_format_valid", "no_harmful_content"],
}


def seed(db_url: str, runs: int, transitions: int, work: Path) -> str:
    """Fill the ledger; returns the run id `inspect` is timed on (the newest, with the most history)."""
    from sqlalchemy import insert

    from trainpipe.config import load_config
    from trainpipe.store import schema as s
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(db_url)
    snapshot = load_config(ROOT / "configs" / "quickstart.yaml").model_dump(mode="json")
    started = time.time() - runs * 60.0
    run_ids = [f"quickstart-bench-{i:06d}" for i in range(runs)]
    run_rows, stage_rows, attempt_rows, gate_rows, check_rows = [], [], [], [], []
    checkpoint_rows, artifact_rows, transition_rows = [], [], []
    attempt_id = gate_id = 0
    per_run = max(1, transitions // runs)
    for i, run_id in enumerate(run_ids):
        created = started + i * 60.0
        # A few failed and interrupted runs, so `status` prints its resume hints as it would.
        state = "failed" if i % 97 == 0 else "interrupted" if i % 89 == 0 else "succeeded"
        run_dir = str(work / "out" / run_id)
        run_rows.append({"run_id": run_id, "pipeline_id": "quickstart", "state": state, "config_path": None,
                         "config_snapshot": snapshot, "output_dir": str(work / "out"), "run_dir": run_dir,
                         "created_at": created, "updated_at": created + 50, "finished_at": created + 50,
                         "current_stage": "dpo", "final_model_path": f"{run_dir}/dpo/merged"})
        for position, stage in enumerate(STAGES):
            t0 = created + 15 * position
            stage_rows.append({"run_id": run_id, "name": stage, "position": position, "state": "passed",
                               "output_path": f"{run_dir}/{stage}", "updated_at": t0 + 15})
            attempt_id += 1
            attempt_rows.append({"id": attempt_id, "run_id": run_id, "stage": stage, "attempt": 1,
                                 "outcome": "passed", "started_at": t0, "finished_at": t0 + 15, "pid": 1000 + i,
                                 "host": "bench", "exit_code": 0, "error": None, "resumed_from": None,
                                 "overrides": {}, "metrics": {"final_loss": 0.77, "total_steps": 30,
                                                              "final_model_path": f"{run_dir}/dpo/merged"}})
            gate_id += 1
            gate_rows.append({"id": gate_id, "run_id": run_id, "stage": stage, "attempt_id": attempt_id,
                              "gate": f"gate{position + 1}", "passed": True, "created_at": t0 + 15})
            check_rows += [{"gate_result_id": gate_id, "name": name, "passed": True, "severity": "error",
                            "mode": "parallel", "value": 0.5, "threshold": "< 1.5", "duration_s": 0.12,
                            "details": "ok"} for name in GATE_CHECKS[stage]]
            if stage != "merge":
                checkpoint_rows += [{"run_id": run_id, "stage": stage, "attempt_id": attempt_id, "step": step,
                                     "path": f"{run_dir}/.work/{stage}/checkpoints/checkpoint-{step}",
                                     "manifest_sha256": "0" * 64, "created_at": t0 + step} for step in (5, 10)]
            artifact_rows += [{"run_id": run_id, "stage": stage, "path": f"{run_dir}/{stage}/{name}",
                               "size_bytes": 1000, "sha256": "0" * 64, "created_at": t0 + 15}
                              for name in ("model.safetensors", "config.json")]
        count = per_run + (1 if i < transitions - per_run * runs else 0)
        transition_rows += [{"run_id": run_id, "stage": STAGES[k % 3] if k else None, "from_state": "pending",
                             "to_state": "running", "trigger": "start", "at": created + k, "pid": 1000 + i,
                             "host": "bench", "detail": {"resume_from": None}} for k in range(count)]
    seeding = time.perf_counter()
    with ledger._writer.begin() as conn:  # noqa: SLF001 - a benchmark fixture, not a second writer
        for table, rows in ((s.runs, run_rows), (s.stages, stage_rows), (s.stage_attempts, attempt_rows),
                            (s.gate_results, gate_rows), (s.gate_checks, check_rows),
                            (s.checkpoints, checkpoint_rows), (s.artifacts, artifact_rows),
                            (s.transitions, transition_rows)):
            conn.execute(insert(table), rows)
    ledger.close()
    print(f"seeded {runs:,} runs, {len(transition_rows):,} transitions, {len(check_rows):,} gate checks "
          f"in {time.perf_counter() - seeding:.1f} s")
    return run_ids[-1]


def timed(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--db", type=Path, help="keep the ledger here (reused when it exists)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="also time another checkout's trainpipe (e.g. `git archive` of an older commit), "
                             "interleaved with this one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainpipe-cli-bench-") as tmp:
        work = Path(tmp)
        db_path = args.db.resolve() if args.db else work / "ledger.db"
        db_url = f"sqlite:///{db_path}"
        if db_path.exists():
            from trainpipe.store.ledger import Ledger

            run_id = Ledger(db_url).list_runs(limit=1)[0]["run_id"]
            print(f"reusing {db_path}")
        else:
            run_id = seed(db_url, args.runs, args.transitions, work)
        env = {**os.environ, "TRAINPIPE_DB": db_url, "TRAINPIPE_HOME": str(work / "home")}
        # An installed trainpipe has its bytecode cached (pip compiles on install); a shell that sets
        # PYTHONDONTWRITEBYTECODE would have every run compile trainpipe from source (~30 ms here).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        commands = {
            "python -c pass (baseline)": [sys.executable, "-c", "pass"],
            "trainpipe status": [sys.executable, "-m", "trainpipe.cli.app", "status"],
            "trainpipe status --json": [sys.executable, "-m", "trainpipe.cli.app", "status", "--json"],
            "trainpipe status --all": [sys.executable, "-m", "trainpipe.cli.app", "status", "--all"],
            "trainpipe inspect RUN_ID": [sys.executable, "-m", "trainpipe.cli.app", "inspect", run_id],
            "trainpipe inspect RUN_ID --json": [sys.executable, "-m", "trainpipe.cli.app", "inspect", run_id,
                                                "--json"],
        }
        where = {label: (env, ROOT) for label in commands}
        if args.baseline:
            # `python -m` puts the working directory first on sys.path: run the baseline from its checkout.
            baseline = args.baseline.resolve()
            baseline_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(baseline), env.get("PYTHONPATH")]))}
            for label in [label for label in commands if "baseline" not in label]:
                commands[f"{label} [{baseline.name}]"] = commands[label]
                where[f"{label} [{baseline.name}]"] = (baseline_env, baseline)
        for label, cmd in commands.items():  # warm the page cache and write the .pyc files
            timed(cmd, *where[label])
        times: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(args.repeat):  # interleaved, so a burst of load hits every command alike
            for label, cmd in commands.items():
                times[label].append(timed(cmd, *where[label]))
        print(f"\n| command | median | min | max | target |\n|---|---|---|---|---|")
        for label, values in times.items():
            target = "-" if "baseline" in label or "--all" in label or "[" in label else (
                f"<= {TARGET_S} s: {'met' if statistics.median(values) <= TARGET_S else 'NOT met'}")
            print(f"| `{label}` | {statistics.median(values):.3f} s | {min(values):.3f} s | {max(values):.3f} s "
                  f"| {target} |")
        print(f"\n{args.repeat} invocations each, interleaved; os.getloadavg() at the end: "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
