"""torchrun on CPU: the quickstart's SFT stage with 2 processes (gloo DDP) vs 1, same global batch.

1 process: batch_size 8, with the default threads and again with OMP_NUM_THREADS=1 (what torchrun
gives each rank). 2 processes: batch_size 4 per rank, so every side takes optimizer steps over 8 rows
on the same data, seed and step count. Each side is a real `trainpipe run` (SFT alone, --no-cache),
alternated ROUNDS times in this one invocation. Per side it reports:
- training wall time: the Trainer's own `train_runtime` (from the model's first step to its last; no
  imports, model load, tokenization or gate), and samples/s = steps x 8 / train_runtime;
- the whole `trainpipe run` wall time (process start, torchrun rendezvous, gate, ledger included);
- the final logged loss;
- the 1-minute load average before each run: the machine is shared, and on 2 cores a second
  process competes with everything else that runs.

    python benchmarks/ddp.py [--rounds 2] [--steps 60] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
ONE, TWO = "1 process", "2 processes (torchrun, gloo)"
# torchrun gives each rank OMP_NUM_THREADS=1; a lone process uses one thread per core. The third side
# separates "two processes" from "one thread each": on a loaded 2-core box, two OpenMP threads that
# wait on each other at every op barrier can be far slower than one.
SIDES: dict[str, tuple[list[str], dict[str, str]]] = {
    ONE: (["sft.batch_size=8"], {}),
    "1 process, OMP_NUM_THREADS=1": (["sft.batch_size=8"], {"OMP_NUM_THREADS": "1"}),
    TWO: (["sft.batch_size=4", "sft.launcher.type=torchrun", "sft.launcher.nproc_per_node=2"], {}),
}


def run_side(out: Path, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    args = [a for s in [f"output_dir={out}", *sets] for a in ("--set", s)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "run", "configs/quickstart.yaml", "--no-cache",
                           *args], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"trainpipe run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = Path(re.search(r"run dir: (\S+)", proc.stdout).group(1))
    results = sorted((run_dir / ".work" / "sft").glob("result-*.json"))
    result = json.loads(results[-1].read_text(encoding="utf-8"))
    summary = next(e for e in reversed(result["log_history"]) if "train_runtime" in e)
    steps = int(result["metrics"]["total_steps"])
    return {"wall_s": wall, "train_s": float(summary["train_runtime"]), "steps": steps,
            "samples_per_s": steps * GLOBAL_BATCH / float(summary["train_runtime"]),
            "final_loss": float(result["metrics"]["final_loss"]), "load_before": load,
            "world_size": result["metrics"].get("world_size", 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    common = ["stages.merge.enabled=false", "stages.dpo.enabled=false", f"sft.max_steps={args.steps}",
              "sft.gradient_accumulation=1", f"checkpoint_every_n_steps={args.steps}",
              # The gate is the same work on both sides; keep it from failing a short run.
              "validation.checks.output_format_valid.severity=warn", "validation.max_loss=6.5",
              "validation.checks.loss_went_down.severity=warn", *args.sets]
    figures: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="trainpipe-bench-ddp-") as tmp:
        env = {**os.environ, "TRAINPIPE_DB": f"sqlite:///{tmp}/ledger.db", "TRAINPIPE_HOME": f"{tmp}/home",
               "TRAINPIPE_CACHE": os.environ.get("TRAINPIPE_CACHE", f"{tmp}/cache")}
        env.pop("TRAINPIPE_FAULT", None)
        for round_no in range(args.rounds):
            for side, (sets, side_env) in SIDES.items():
                row = run_side(Path(tmp) / "out", common + sets, {**env, **side_env})
                figures[side].append(row)
                print(f"round {round_no + 1} {side}: train {row['train_s']:.2f} s, {row['samples_per_s']:.1f} "
                      f"samples/s, run {row['wall_s']:.1f} s, final loss {row['final_loss']:.4f}, "
                      f"load {row['load_before']:.2f}", flush=True)
    print(f"\nload average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.steps} optimizer steps x global batch {GLOBAL_BATCH}, median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print("| side | training (train_runtime) | samples/s | trainpipe run | final loss | load before |")
    print("|---|---|---|---|---|---|")
    med = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in figures.items()}
    for side, m in med.items():
        loads = ", ".join(f"{r['load_before']:.1f}" for r in figures[side])
        print(f"| {side} | {m['train_s']:.2f} s | {m['samples_per_s']:.1f} | {m['wall_s']:.1f} s | "
              f"{m['final_loss']:.4f} | {loads} |")
    for side in SIDES:
        if side == TWO:
            continue
        one, two = med[side], med[TWO]
        print(f"ratio 2 processes / {side}: training time {two['train_s'] / one['train_s']:.2f}, "
              f"samples/s {two['samples_per_s'] / one['samples_per_s']:.2f}, "
              f"run wall {two['wall_s'] / one['wall_s']:.2f}")


if __name__ == "__main__":
    main()
