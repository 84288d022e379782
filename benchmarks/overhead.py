"""What trainpipe costs on top of the same work done by a plain TRL script.

1. `trainpipe run configs/quickstart.yaml` vs benchmarks/plain_trl.py (same model, data, settings),
   alternated ROUNDS times in this one invocation; prints each wall time and the median ratio.
2. `trainpipe status` (20 most recent) and `status --all` wall time with 10,000 runs in the ledger.

    python benchmarks/overhead.py [--rounds 3] [--runs 10000]
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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def pipeline_overhead(rounds: int, work: Path, env: dict[str, str]) -> None:
    # Build the tiny model once, outside the timings, so both sides start from the cache.
    subprocess.run([sys.executable, "-c", "from trainpipe.stages.tiny_model import ensure_tiny_model as e; e()"],
                   env=env, check=True, capture_output=True)
    ours, plain = [], []
    for i in range(rounds):
        # --no-cache: every round must train (the rounds share a ledger, so round 2 would reuse round 1).
        ours.append(timed([sys.executable, "-m", "trainpipe.cli.app", "run", "configs/quickstart.yaml", "--no-cache",
                           "--set", f"output_dir={work / f'tp-{i}'}"], env))
        plain.append(timed([sys.executable, "benchmarks/plain_trl.py", str(work / f"plain-{i}")], env))
        print(f"round {i + 1}: trainpipe {ours[-1]:.1f} s, plain TRL {plain[-1]:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(ours, plain)]
    print(f"trainpipe run: median {statistics.median(ours):.1f} s; plain TRL: median {statistics.median(plain):.1f} s")
    print(f"median wall-time ratio trainpipe/plain: {statistics.median(ratios):.2f}x")


def status_at_scale(runs: int, work: Path, env: dict[str, str]) -> None:
    from trainpipe.store.ledger import Ledger

    db = f"sqlite:///{work / 'status.db'}"
    ledger = Ledger(db)
    seed_started = time.perf_counter()
    for i in range(runs):
        ledger.create_run(run_id=f"bench-{i:05d}", pipeline_id="bench", config_snapshot={"pipeline_id": "bench"},
                          config_path=None, output_dir=str(work), run_dir=str(work / f"bench-{i:05d}"),
                          stages=["sft", "merge", "dpo"])
    print(f"seeded {runs} runs in {time.perf_counter() - seed_started:.1f} s")
    env = {**env, "TRAINPIPE_DB": db}
    for label, extra in (("status", []), ("status --all", ["--all"]), ("status --all --json", ["--all", "--json"])):
        times = [timed([sys.executable, "-m", "trainpipe.cli.app", "status", *extra], env) for _ in range(5)]
        print(f"`trainpipe {label}` with {runs} runs: median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}, 5 runs)")
    baseline = [timed([sys.executable, "-c", "pass"], env) for _ in range(5)]
    print(f"baseline `python -c pass`: median {statistics.median(baseline):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainpipe-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}",
               "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("TRAINPIPE_CACHE", str(work / "cache"))
        if not args.skip_pipeline:
            pipeline_overhead(args.rounds, work, env)
        status_at_scale(args.runs, work, env)


if __name__ == "__main__":
    main()
