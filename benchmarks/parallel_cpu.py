"""`trainpipe sweep --parallel 2` on CPU: the cores shared out between the trials, or not.

A 2-trial sweep over `sft.learning_rate` (so neither trial can reuse the other's stages: both train
SFT, merge and DPO), run three ways in this one invocation, each with a fresh ledger and output dir:
- `--parallel 1`: the trials one after the other, each with one OpenMP thread per core (torch's default);
- `--parallel 2` with OMP_NUM_THREADS set to the core count: both trials at once, each with one thread
  per core, as every `--parallel` sweep ran before trainpipe shared the cores out;
- `--parallel 2` as shipped: trainpipe gives each trial cores // 2 threads (engine/sweep.py).
It checks that every side trained the same stages for the same optimizer steps (read from the ledger)
and prints each side's wall time and its ratio to `--parallel 1`, plus the thread count torch reported
in each stage process (the `cpu_threads` metric).

    python benchmarks/parallel_cpu.py          # the tests' shortened quickstart (~1 min per side, more
                                               # for the oversubscribed side)
    python benchmarks/parallel_cpu.py --full   # the quickstart as shipped
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from trainpipe.cpus import usable_cores  # noqa: E402
from trainpipe.store.ledger import Ledger  # noqa: E402

QUICKSTART = REPO / "configs" / "quickstart.yaml"
FAST = ["sft.max_steps=12", "dpo.max_steps=6", "checkpoint_every_n_steps=4", "validation.max_loss=6.5",
        "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn",
        "validation.max_new_tokens=32"]


def run_side(work: Path, parallel: int, threads: str | None, sets: list[str]) -> dict:
    work.mkdir(parents=True)
    sweep_file = work / "sweep.yaml"
    sweep_file.write_text(json.dumps({"base": str(QUICKSTART), "space": {"sft.learning_rate": [2e-3, 1e-3]},
                                      "objective": {"metric": "dpo.rewards/accuracies", "direction": "maximize"}}),
                          encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TRAINPIPE_FAULT")}
    env.update(TRAINPIPE_DB=f"sqlite:///{work}/ledger.db", TRAINPIPE_HOME=str(work / "home"),
               TRAINPIPE_CACHE=str(work / "cache"))
    if threads:
        env["OMP_NUM_THREADS"] = threads
    args = [a for s in [f"output_dir={work / 'out'}", *sets] for a in ("--set", s)]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "sweep", str(sweep_file), "--parallel",
                           str(parallel), *args], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ledger = Ledger(env["TRAINPIPE_DB"])
    sweep_id = proc.stdout.split()[1]
    trials = ledger.sweep_trials(sweep_id)
    work_done, threads_seen = [], set()
    for trial in trials:
        attempts = ledger.attempts(trial["run_id"])
        work_done.append(sorted((a["stage"], a["outcome"], a["metrics"].get("total_steps")) for a in attempts))
        threads_seen |= {a["metrics"].get("cpu_threads") for a in attempts}
    return {"wall_s": wall, "work": work_done, "threads": sorted(threads_seen, key=str)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the quickstart as shipped, not the tests' short settings")
    args = parser.parse_args()
    sets = [] if args.full else FAST
    n = usable_cores()
    sides = {"--parallel 1": (1, None),
             f"--parallel 2, OMP_NUM_THREADS={n} (each trial every core)": (2, str(n)),
             "--parallel 2 (trainpipe shares the cores out)": (2, None)}
    figures = {}
    with tempfile.TemporaryDirectory(prefix="trainpipe-bench-parallel-") as tmp:
        for index, (name, (parallel, threads)) in enumerate(sides.items()):
            load = os.getloadavg()[0]
            figures[name] = run_side(Path(tmp) / f"side{index}", parallel, threads, sets) | {"load": load}
            print(f"{name}: {figures[name]['wall_s']:.1f} s (load before {load:.2f})", flush=True)
    reference = figures["--parallel 1"]
    for name, side in figures.items():
        if side["work"] != reference["work"]:
            sys.exit(f"{name} did different work than --parallel 1:\n{side['work']}\n{reference['work']}")
    print(f"\n{n} CPU cores; both trials trained: {reference['work'][0]}")
    print("| side | wall s | vs --parallel 1 | torch threads per stage process |\n|---|---|---|---|")
    for name, side in figures.items():
        print(f"| {name} | {side['wall_s']:.1f} | {side['wall_s'] / reference['wall_s']:.2f}x | {side['threads']} |")


if __name__ == "__main__":
    main()
