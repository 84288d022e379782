"""Data at a user's size (issue 18), figures for benchmarks/RESULTS.md.

    python benchmarks/data_scale.py                      # all three parts (~15-25 min on 2 CPU cores)
    python benchmarks/data_scale.py --part checks --rows 1000000
    python benchmarks/data_scale.py --part resume --rows 240000
    python benchmarks/data_scale.py --part sweep

1. checks: `trainpipe run`'s row checks on an N-row SFT JSONL (chat messages, ~280 bytes a row):
   wall time, and peak resident memory against a baseline process that imports the same modules
   and reads nothing. Targets: 1,000,000 rows in <= 30 s, <= 300 MB extra.
2. resume: SFT on an N-row file, the orchestrator SIGKILLed mid-training, then `trainpipe resume`.
   For each attempt, the time from its start (ledger) to its first training step (the trainer's
   own train-begin event): the resumed attempt reuses the tokenized data. Target: resume <= 10% of
   the first attempt. Both attempts are the same stage of the same run: same model, data and steps.
3. sweep: a 4-trial `dpo.beta` sweep; how many DPO attempts prepared (tokenized) the preference set
   and how many reused it, read from the ledger. Target: prepared once.

Everything runs in a fresh temporary home, ledger and output dir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TASK_API = REPO / "examples" / "task_api"

MEASURE_CHECK = """
import json, resource, sys, time
from trainpipe.stages.data import validate
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = {} if sys.argv[1] == "-" else validate(sys.argv[1], "sft")
took = time.perf_counter() - started
print(json.dumps({"result": result, "seconds": took, "rss_before_kb": baseline,
                  "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_sft(path: Path, rows: int) -> Path:
    source = [json.loads(line) for line in (TASK_API / "sft.jsonl").read_text().splitlines()]
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            row = json.loads(json.dumps(source[i % len(source)]))
            row["messages"][1]["content"] += f" (#{i})"
            out.write(json.dumps(row) + "\n")
    return path


def part_checks(work: Path, rows: int) -> dict:
    data = write_sft(work / "sft.jsonl", rows)
    runs = {}
    for label, arg in (("baseline (imports only)", "-"), ("row checks", str(data))):
        proc = subprocess.run([sys.executable, "-c", MEASURE_CHECK, arg], capture_output=True, text=True, check=True)
        runs[label] = json.loads(proc.stdout)
    checked = runs["row checks"]
    extra_mb = (checked["rss_peak_kb"] - runs["baseline (imports only)"]["rss_peak_kb"]) / 1024
    return {"rows": checked["result"]["rows"], "file_mb": round(data.stat().st_size / 1e6, 1),
            "seconds": round(checked["seconds"], 2), "rows_per_s": round(rows / checked["seconds"]),
            "extra_rss_mb": round(extra_mb, 1)}


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "TRAINPIPE_HOME": str(work / "home"), "TRAINPIPE_DB": f"sqlite:///{work / 'ledger.db'}",
            "TRAINPIPE_RETRY_BACKOFF_S": "0"}


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _first_step_seconds(events: Path, started_at: float) -> float:
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "progress":
            return event["time"] - started_at
    raise RuntimeError(f"{events}: no training step was recorded")


def part_resume(work: Path, rows: int) -> dict:
    from trainpipe.store.ledger import Ledger

    data = write_sft(work / "sft-resume.jsonl", rows)
    env = _env(work / "resume")
    overrides = [f"output_dir={work / 'resume' / 'out'}", f"datasets.sft={data}", "stages.merge.enabled=false",
                 "stages.dpo.enabled=false", "sft.max_steps=8", "checkpoint_every_n_steps=4",
                 "validation.checks.output_format_valid.severity=warn",
                 "validation.checks.loss_went_down.severity=warn", "validation.max_new_tokens=16"]
    fired = work / "resume" / "fired"
    env["TRAINPIPE_FAULT"] = json.dumps({"stage": "sft", "step": 6, "action": "pause", "seconds": 600,
                                         "once_file": str(fired)})
    (work / "resume").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), *_sets(overrides)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not fired.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended ({proc.returncode}) before the kill point")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ledger = Ledger(env["TRAINPIPE_DB"])
    run_id = ledger.list_runs()[0]["run_id"]
    env.pop("TRAINPIPE_FAULT")
    subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "resume", run_id], env=env, check=True,
                   capture_output=True)
    run = ledger.get_run(run_id)
    work_dir = Path(run["run_dir"]) / ".work" / "sft"
    out = {"rows": rows, "run_id": run_id}
    for attempt in ledger.attempts(run_id, "sft"):
        n = attempt["attempt"]
        data_record = (attempt.get("metrics") or {}).get("data", {}).get("sft", {})
        out[f"attempt_{n}"] = {"to_first_step_s": round(_first_step_seconds(work_dir / f"events-{n}.jsonl",
                                                                              attempt["started_at"]), 2),
                               "data": data_record.get("action"), "resumed_from": attempt["resumed_from"],
                               "outcome": attempt["outcome"]}
    out["ratio"] = round(out["attempt_2"]["to_first_step_s"] / out["attempt_1"]["to_first_step_s"], 3)
    return out


def part_sweep(work: Path) -> dict:
    from trainpipe.store.ledger import Ledger

    env = _env(work / "sweep")
    sweep = work / "sweep.yaml"
    sweep.write_text(f"name: data-scale\nbase: {QUICKSTART}\nspace:\n  dpo.beta: [0.05, 0.1, 0.2, 0.3]\n"
                     "strategy: grid\nobjective:\n  metric: dpo.rewards/accuracies\n  direction: maximize\n")
    overrides = [f"output_dir={work / 'sweep' / 'out'}", "sft.max_steps=12", "dpo.max_steps=6",
                 "validation.checks.output_format_valid.severity=warn",
                 "validation.checks.loss_went_down.severity=warn", "validation.max_new_tokens=16"]
    (work / "sweep").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "trainpipe.cli.app", "sweep", str(sweep), *_sets(overrides)], env=env,
                   check=False, capture_output=True)
    ledger = Ledger(env["TRAINPIPE_DB"])
    actions: dict[str, list[str]] = {"preference": [], "preference_eval": []}
    trials = 0
    for run in ledger.list_runs(limit=None):
        trials += 1
        for attempt in ledger.attempts(run["run_id"], "dpo"):
            for role, record in ((attempt.get("metrics") or {}).get("data") or {}).items():
                actions.setdefault(role, []).append(record.get("action"))
    return {"trials": trials, **{role: {"prepared": a.count("prepared"), "reused": a.count("reused")}
                                 for role, a in actions.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["checks", "resume", "sweep", "all"], default="all")
    parser.add_argument("--rows", type=int, default=None, help="rows for checks (default 1,000,000) and resume "
                        "(default 240,000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainpipe-data-scale-") as tmp:
        work = Path(tmp)
        if args.part in ("checks", "all"):
            print("checks:", json.dumps(part_checks(work, args.rows or 1_000_000)), flush=True)
        if args.part in ("resume", "all"):
            print("resume:", json.dumps(part_resume(work, args.rows or 240_000)), flush=True)
        if args.part in ("sweep", "all"):
            print("sweep:", json.dumps(part_sweep(work)), flush=True)


if __name__ == "__main__":
    main()
