"""Stage cache and sweep figures for benchmarks/RESULTS.md.

    python benchmarks/sweep.py            # the quickstart as shipped (~6 min on 2 CPU cores)
    python benchmarks/sweep.py --fast     # the tests' shortened settings (~2 min)

1. No-op re-run: `trainpipe run configs/quickstart.yaml` once to fill the cache, then the same command
   again N times; the wall time of each (the whole CLI process, interpreter start included) and
   whether the re-run imported torch (checked in a separate in-process run).
2. A 4-trial `dpo.beta` sweep, with `--parallel 1` and `--parallel 2`: stage trainings and optimizer
   steps it executed, read from the ledger, against the naive count (every trial trains every
   stage), and its wall time.

Everything runs in a fresh temporary ledger and output dir; nothing touches ~/.trainpipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
FAST = ["sft.max_steps=12", "dpo.max_steps=6", "checkpoint_every_n_steps=4", "validation.max_loss=6.5",
        "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn",
        "validation.max_new_tokens=32"]


def _cli(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"trainpipe {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return took, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the tests' shortened settings")
    parser.add_argument("--repeats", type=int, default=5, help="no-op re-runs to time")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trainpipe-bench-sweep-"))
    env = {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRAINPIPE_FAULT", None)
    sets = [f"output_dir={work / 'out'}", *(FAST if args.fast else [])]
    set_args = [a for s in sets for a in ("--set", s)]
    print(f"settings: {'--fast (tests)' if args.fast else 'quickstart as shipped'}; work dir {work}")

    # 1. no-op re-run
    first, _ = _cli(env, "run", str(QUICKSTART), *set_args)
    print(f"first run (trains all three stages): {first:.1f} s")
    walls = [_cli(env, "run", str(QUICKSTART), *set_args)[0] for _ in range(args.repeats)]
    code = ("import json, sys, trainpipe\n"
            f"r = trainpipe.run({str(QUICKSTART)!r}, overrides={sets!r})\n"
            "print(json.dumps([r.state, [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]]))")
    state, heavy = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                             cwd=REPO, check=True).stdout.strip().splitlines()[-1])
    print(f"no-op re-run, `trainpipe run` wall over {args.repeats}: median {statistics.median(walls):.2f} s, "
          f"min {min(walls):.2f} s, max {max(walls):.2f} s; state {state}; heavy modules imported: {heavy or 'none'}")

    # 2. a 4-trial beta sweep, sequential then --parallel 2, each in a ledger of its own so that nothing
    #    is shared with the runs above or with each other
    sys.path.insert(0, str(REPO))
    from trainpipe.store.ledger import Ledger

    sweep_file = work / "sweep_beta4.yaml"
    sweep_file.write_text(json.dumps({
        "name": "beta4", "base": str(QUICKSTART), "space": {"dpo.beta": [0.05, 0.1, 0.2, 0.3]}, "strategy": "grid",
        "objective": {"metric": "dpo.rewards/accuracies", "direction": "maximize"}}), encoding="utf-8")
    for parallel in (1, 2):
        env["TRAINPIPE_DB"] = f"sqlite:///{work / f'sweep-ledger-p{parallel}.db'}"
        out = [f"output_dir={work / f'sweep-out-p{parallel}'}", *(FAST if args.fast else [])]
        sweep_wall, proc = _cli(env, "sweep", str(sweep_file), "--parallel", str(parallel),
                                *[a for s in out for a in ("--set", s)])
        sweep_id = proc.stdout.split()[1]
        _, status = _cli(env, "sweep-status", sweep_id, "--json")
        report = json.loads(status.stdout)
        ledger = Ledger(env["TRAINPIPE_DB"])
        steps = {"sft": 0, "dpo": 0}
        per_trial: dict[str, int] = {}
        for trial in report["trials"]:
            for attempt in ledger.attempts(trial["run_id"]):
                if attempt["stage"] in steps:
                    done = int((attempt["metrics"] or {}).get("total_steps") or 0)
                    steps[attempt["stage"]] += done
                    per_trial[attempt["stage"]] = done
        ledger.close()
        trials = len(report["trials"])
        naive_steps = trials * sum(per_trial.values())
        print(f"4-trial dpo.beta sweep --parallel {parallel} ({sweep_id}): wall {sweep_wall:.1f} s")
        print(f"  stage trainings: {report['stage_trainings']} vs naive {report['naive_stage_trainings']}")
        print(f"  optimizer steps: {sum(steps.values())} (sft {steps['sft']}, dpo {steps['dpo']}) vs naive "
              f"{naive_steps} ({trials} x (sft {per_trial.get('sft', 0)} + dpo {per_trial.get('dpo', 0)}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
