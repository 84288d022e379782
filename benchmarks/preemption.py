"""Preemption on a real Slurm: runs submitted with `trainpipe submit --slurm`, preempted at random points,
each either warned (USR2: the job checkpoints and requeues itself) or hard-killed and requeued.

    eval "$(.ci/start-slurm --env)"                    # a one-host cluster (sets SLURM_CONF)
    python benchmarks/preemption.py                    # 4 runs x 2 preemptions (~5 min on 2 CPU cores)
    python benchmarks/preemption.py --full             # 12 runs x 3 preemptions (~15 min)
    .ci/start-slurm --stop "$TRAINPIPE_TEST_SLURM_DIR"

Configurations (`--configs`, runs alternate between them): `quickstart` is the tests' resume config
(configs/quickstart.yaml, SFT 12 steps, DPO 6, a checkpoint every 2 steps); `long-sft` the same with
SFT 60 steps and a checkpoint every 10. Each gets one uninterrupted reference run (plain `trainpipe
run`, outside Slurm) whose final weights (SFT adapter, DPO adapter, merged model) every preempted run
must equal bit for bit.

Each preempted run is one `trainpipe submit --slurm` job with its own ledger, TRAINPIPE_HOME (so its
own tokenized-data cache) and output dir; all share one model cache (TRAINPIPE_CACHE). A seeded RNG
(`--seed`) deals each run `--preemptions` (point, kind) pairs from shuffled blocks that hold every pair
once, and draws the step or stage within the point. Points: mid-SFT step, a checkpoint being saved
(SFT or DPO), the merge, a gate (SFT, merge or DPO), mid-DPO step. Kinds:
- warning: `scancel --signal=USR2 --batch JOB`, nothing else; the job must checkpoint, stop and
  requeue itself (`scontrol requeue` from inside the job);
- kill: no warning to the stage: `scancel --signal=KILL --batch JOB` (`trainpipe run`, the batch
  step's process, gets SIGKILL and records nothing: its scheduler_jobs row is later marked `lost`) or
  `--full` (`--kill-form`; Slurm 22.05 then cancels the job: the stage process is SIGKILLed, but
  `trainpipe run` gets a SIGTERM first and records the interrupt as `terminated`), then
  `scontrol requeue JOB` once Slurm has ended the job.
The training steps take ~20 ms here, so a point is placed by the test-only fault hook where one can
(TRAINPIPE_FAULT, one per job: a pause at SFT/DPO step k, at the merge's start or before a gate; the
signal goes while it pauses), otherwise by polling the run's event files and checkpoint dirs every
20 ms and signalling at once: "a checkpoint being saved" is a signal sent as soon as the directory
checkpoint-N appears (the save of the tiny model takes ~30 ms, so it lands in the save or just after).
Where each signal actually landed is read back afterwards from the attempt's own events ("landed").

Measured, per preemption and in total (goals in brackets):
- finished: the run ended `succeeded` [all];
- identical: final weights equal to the reference run's, max abs diff 0 [all];
- steps trained twice: per stage, steps an attempt finished (trainer on_step_end events) that an
  earlier attempt had also finished, charged to the preemption before that attempt
  [0 with a warning; at most one checkpoint interval without];
- re-tokenized: attempts that tokenized a dataset ("prepared") that an earlier attempt of the same run
  had already prepared, from the ledger's attempt metrics (events where an attempt has none) [never];
- restart -> first step: from the requeued execution's launch (slurmd's log, "Launching batch job";
  the execution's scheduler_jobs.started_at where the log cannot be read) to its first finished
  training step, for executions that resume inside SFT or DPO [<= 10 s on the quickstart], split into
  launch -> ledger claim -> stage worker started -> trainer began -> first step;
- hold: the scheduler's own delay, from the requeue (the job's own `scontrol requeue`, as its
  scheduler_jobs row ended, or ours after a kill) to slurmd launching the job again; reported apart,
  not part of the restart time (cred_expire=5 in .ci/start-slurm's slurm.conf; Slurm's default 120 s).
Both sides did the same work: every run trains the same config as its reference (same steps), which
the identical-weights check confirms. The script cancels its jobs on exit and removes its temporary
directory unless --workdir/--keep.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STAGES = ("sft", "merge", "dpo")
GATE = 10**6  # position of a stage's gate, after every step
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED")
# The tests' shortened quickstart (tests/conftest.py fast_overrides + resume_overrides).
COMMON = ["validation.max_loss=6.5", "validation.checks.output_format_valid.severity=warn",
          "validation.checks.loss_went_down.severity=warn", "validation.max_new_tokens=32"]
CONFIGS = {"quickstart": {"sft": 12, "dpo": 6, "interval": 2},
           "long-sft": {"sft": 60, "dpo": 6, "interval": 10}}
POINT_KINDS = ("sft-step", "checkpoint-save", "merge", "gate", "dpo-step")

JOBS: list[str] = []  # every job submitted, cancelled on exit


def overrides(out: Path, name: str) -> list[str]:
    c = CONFIGS[name]
    return [f"output_dir={out}", *COMMON, f"checkpoint_every_n_steps={c['interval']}",
            f"sft.max_steps={c['sft']}", f"dpo.max_steps={c['dpo']}"]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def cli(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def first_json(text: str) -> dict:
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


# ------------------------------------------------------------------ Slurm


def job_info(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def slurm_log_files() -> tuple[Path | None, Path | None]:
    conf = Path(os.environ.get("SLURM_CONF", ""))
    found: dict[str, Path] = {}
    if conf.is_file():
        for line in conf.read_text().splitlines():
            m = re.match(r"\s*(SlurmctldLogFile|SlurmdLogFile)\s*=\s*(\S+)", line)
            if m:
                found[m.group(1)] = Path(m.group(2))
    return found.get("SlurmctldLogFile"), found.get("SlurmdLogFile")


def log_times(path: Path | None, pattern: str) -> list[float]:
    """Timestamps (local time, ms) of the log lines matching `pattern`, in order."""
    if path is None or not path.is_file():
        return []
    times = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\] (.*)", line)
        if m and re.search(pattern, m.group(2)):
            stamp = m.group(1)
            times.append(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f" if "." in stamp
                                           else "%Y-%m-%dT%H:%M:%S").timestamp())
    return times


def job_processes(job_id: str) -> list[int]:
    """Live processes of the job (SLURM_JOB_ID in their environment, this cluster's SLURM_CONF)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={os.environ.get('SLURM_CONF', '')}".encode()}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if want <= set((entry / "environ").read_bytes().split(b"\0")):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z" and (entry / "comm").read_text().strip() != "slurmstepd":
                    pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def cancel_all() -> None:
    for job in JOBS:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


# ------------------------------------------------------------------ events


def read_events(path: Path) -> list[dict]:
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a kill can cut the last line short
    return events


class Tracker:
    """Tails <run_dir>/.work/<stage>/events-N.jsonl and lists checkpoint dirs while a run is driven."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.offsets: dict[tuple[str, int], int] = {}
        self.events: dict[tuple[str, int], list[dict]] = {}

    def poll(self) -> None:
        for stage in STAGES:
            for path in (self.run_dir / ".work" / stage).glob("events-*.jsonl"):
                key = (stage, int(path.stem.split("-")[1]))
                offset = self.offsets.get(key, 0)
                try:
                    with path.open("rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                except OSError:
                    continue
                end = chunk.rfind(b"\n")
                if end < 0:
                    self.events.setdefault(key, [])
                    continue
                self.offsets[key] = offset + end + 1
                for line in chunk[:end].splitlines():
                    try:
                        self.events.setdefault(key, []).append(json.loads(line))
                    except json.JSONDecodeError:
                        pass

    def checkpoint_dirs(self) -> set[tuple[str, int]]:
        found = set()
        for stage in ("sft", "dpo"):
            base = self.run_dir / ".work" / stage / "checkpoints"
            try:
                names = os.listdir(base)
            except OSError:
                continue
            found |= {(stage, int(n.split("-")[1])) for n in names if re.fullmatch(r"checkpoint-\d+", n)}
        return found

    def snapshot(self) -> tuple[set, set]:
        self.poll()
        return set(self.events), self.checkpoint_dirs()

    def position(self, baseline: tuple[set, set]) -> tuple[int, float]:
        """How far the current execution has got: (stage index, step / step+0.5 for a checkpoint being
        written / GATE), from the attempts and checkpoint dirs it created."""
        old_attempts, old_dirs = baseline
        best: tuple[int, float] = (-1, -1)
        for key, events in self.events.items():
            if key in old_attempts:
                continue
            sub: float = 0
            for e in events:
                if e.get("type") == "progress":
                    sub = max(sub, e["step"])
                elif e.get("type") == "checkpoint":
                    sub = max(sub, e["step"] + 0.5)
                elif e.get("type") == "validating":
                    sub = max(sub, GATE)
            best = max(best, (STAGES.index(key[0]), sub))
        for stage, step in self.checkpoint_dirs() - old_dirs:
            best = max(best, (STAGES.index(stage), step + 0.5))
        return best


# ------------------------------------------------------------------ plans


@dataclass
class Aim:
    kind: str                  # one of POINT_KINDS
    stage: str
    step: int | None = None    # the step (or checkpoint step) aimed at
    fault: dict | None = None  # TRAINPIPE_FAULT placing it, if this aim got the run's one fault
    signal: str = "warning"    # warning | kill-batch | kill-full

    @property
    def position(self) -> tuple[int, float]:
        index = STAGES.index(self.stage)
        if self.kind == "gate":
            return index, GATE
        if self.kind == "checkpoint-save":
            return index, self.step + 0.5
        return index, self.step or 0

    def describe(self) -> str:
        if self.kind == "gate":
            text = f"{self.stage} gate"
        elif self.kind == "merge":
            text = "merge"
        elif self.kind == "checkpoint-save":
            text = f"{self.stage} saving ckpt-{self.step}"
        else:
            text = f"{self.stage} step {self.step}"
        return text + (" (pause)" if self.fault else " (poll)")


def draw_aim(kind: str, config: dict, rng: random.Random) -> Aim:
    if kind in ("sft-step", "dpo-step"):
        stage = kind.split("-")[0]
        return Aim(kind, stage, rng.randint(1, config[stage] - 1))
    if kind == "checkpoint-save":
        stage = rng.choice(["sft", "sft", "dpo"])  # SFT has most of the checkpoints
        saves = list(range(config["interval"], config[stage] + 1, config["interval"])) or [config[stage]]
        if config[stage] not in saves:
            saves.append(config[stage])  # the trainer saves at the last step too
        return Aim(kind, stage, rng.choice(saves))
    if kind == "merge":
        return Aim(kind, "merge")
    return Aim("gate", rng.choice(["sft", "sft", "merge", "dpo", "dpo"]))


def deal(total: int, kill_form: str, rng: random.Random) -> list[tuple[str, str]]:
    """(point, signal) for every preemption: each block of 10 holds every point once warned and once
    killed, shuffled, so that even a short invocation covers most combinations."""
    deck: list[tuple[str, str]] = []
    while len(deck) < total:
        block = [(point, signal) for point in POINT_KINDS for signal in ("warning", "kill")]
        rng.shuffle(block)
        deck += block
    return [(point, signal if signal == "warning" else
             kill_form if kill_form != "random" else rng.choice(["kill-batch", "kill-full"]))
            for point, signal in deck[:total]]


def plan_run(combos: list[tuple[str, str]], config: dict, rng: random.Random, once_file: Path) -> list[Aim]:
    aims = []
    for point, how in combos:
        aim = draw_aim(point, config, rng)
        aim.signal = how
        aims.append(aim)
    aims.sort(key=lambda a: a.position)
    # One TRAINPIPE_FAULT per job: to the point that is hardest to hit by polling (merge, gate, a step).
    for wanted in (("merge", "gate"), ("sft-step", "dpo-step")):
        chosen = next((a for a in aims if a.kind in wanted), None)
        if chosen:
            if chosen.kind == "merge":
                chosen.fault = {"stage": "merge", "at": "start", "action": "pause", "seconds": 60}
            elif chosen.kind == "gate":
                chosen.fault = {"stage": chosen.stage, "at": "gate", "action": "pause", "seconds": 60}
            else:
                chosen.fault = {"stage": chosen.stage, "step": chosen.step, "action": "pause", "seconds": 3}
            chosen.fault["once_file"] = str(once_file)
            break
    return aims


# ------------------------------------------------------------------ driving a run


@dataclass
class Preemption:
    aim: Aim
    kind: str                  # warning | kill-batch | kill-full
    signalled_at: float
    restart_before: int        # the execution it hit (SLURM_RESTART_COUNT)
    requeued_at: float | None = None   # our `scontrol requeue` (kills)
    survivors: list[int] = field(default_factory=list)
    note: str = ""


@dataclass
class Run:
    index: int
    config: str
    job_id: str
    run_id: str
    run_dir: Path
    db_url: str
    aims: list[Aim]
    preemptions: list[Preemption] = field(default_factory=list)
    missed: list[Aim] = field(default_factory=list)
    submitted_at: float = 0.0
    ended_at: float = 0.0
    final_state: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False


def run_state(db_url: str, run_id: str) -> str | None:
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(db_url)
    try:
        run = ledger.find_run(run_id)
        return run["state"] if run else None
    finally:
        ledger.close()


def wait(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def submit(index: int, config: str, aims: list[Aim], work: Path, base_env: dict, args) -> Run:
    home = work / f"run{index}"
    home.mkdir(parents=True)
    db_url = f"sqlite:///{home / 'ledger.db'}"
    env = {**base_env, "TRAINPIPE_HOME": str(home / "home"), "TRAINPIPE_DB": db_url}
    fault = next((a.fault for a in aims if a.fault), None)
    if fault:
        env["TRAINPIPE_FAULT"] = json.dumps(fault)
    proc = cli(["submit", str(QUICKSTART), "--slurm", "--json", "--grace", "60",
                "--max-requeues", str(max(5, args.preemptions)), *sets(overrides(home / "out", config))],
               env, work, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"trainpipe submit failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    done = first_json(proc.stdout)
    JOBS.append(done["job_id"])
    return Run(index, config, done["job_id"], done["run_id"], Path(done["script"]).parent.parent, db_url, aims,
               submitted_at=time.time())


def preempt(run: Run, aim: Aim, kind: str, restarts: int) -> Preemption:
    if kind == "warning":
        command = ["scancel", "--signal=USR2", "--batch", run.job_id]
    else:
        command = ["scancel", "--signal=KILL", "--full" if kind == "kill-full" else "--batch", run.job_id]
    subprocess.run(command, capture_output=True, timeout=30)
    done = Preemption(aim, kind, time.time(), restarts)
    if kind == "warning":
        return done
    # No warning: once Slurm has ended the job, requeue it as a preempting scheduler would.
    ended = wait(lambda: job_info(run.job_id).get("JobState") in DONE, timeout=60)
    if not ended:
        done.note = "job did not end within 60 s of the kill"
    done.survivors = job_processes(run.job_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = subprocess.run(["scontrol", "requeue", run.job_id], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            done.requeued_at = time.time()
            break
        time.sleep(0.2)
    else:
        done.note += f" scontrol requeue kept failing: {proc.stderr.strip()}"
    return done


def drive(run: Run, args, once_file: Path) -> None:
    """Fire the run's aims in order as the run reaches them, then wait for the job to finish."""
    tracker = Tracker(run.run_dir)
    baseline: tuple[set, set] = (set(), set())
    baseline_at = 0.0
    restarts = 0
    pending = list(run.aims)
    deadline = time.monotonic() + args.run_timeout
    last_check = 0.0
    while time.monotonic() < deadline:
        if pending:
            tracker.poll()
            aim = pending[0]
            reached = tracker.position(baseline) >= aim.position
            # The fault's pause fired in this execution (not before it: a signal during the job's start,
            # before `trainpipe run` handles USR2, would end the job).
            paused = bool(aim.fault) and once_file.exists() and once_file.stat().st_mtime >= baseline_at
            if reached or paused:
                pending.pop(0)
                kind = aim.signal
                done = preempt(run, aim, kind, restarts)
                run.preemptions.append(done)
                print(f"    {kind:10s} aimed at {aim.describe():28s} (execution {restarts})", flush=True)
                # The next aim counts only what the next execution does.
                started = wait(lambda: _restarted(run, restarts), timeout=180)
                if started == "finished":
                    run.missed += pending
                    pending = []
                elif started:
                    restarts += 1
                    baseline, baseline_at = tracker.snapshot(), time.time()
                else:
                    done.note += " no restart within 180 s"
                continue
        now = time.monotonic()
        if now - last_check > 0.5:
            last_check = now
            info = job_info(run.job_id)
            if info.get("JobState") in DONE and run_state(run.db_url, run.run_id) != "running":
                time.sleep(1.0)  # a requeue would show as Restarts+1 / PENDING by now
                info = job_info(run.job_id)
                if info.get("JobState") in DONE:
                    run.missed += pending
                    run.final_state = info
                    break
        time.sleep(0.02)
    else:
        run.timed_out = True
        run.missed += pending
        subprocess.run(["scancel", run.job_id], capture_output=True, timeout=30)
        run.final_state = job_info(run.job_id)
    run.ended_at = time.time()


def _restarted(run: Run, restarts: int):
    info = job_info(run.job_id)
    if int(info.get("Restarts", 0) or 0) > restarts and info.get("JobState") == "RUNNING":
        return True
    if info.get("JobState") in DONE and int(info.get("Restarts", 0) or 0) <= restarts \
            and run_state(run.db_url, run.run_id) not in ("running", "interrupted"):
        return "finished"  # the signal came too late: the run had finished
    return None


# ------------------------------------------------------------------ analysis


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def final_weights(run_dir: Path) -> dict:
    return {"sft": load_weights(run_dir / "sft" / "adapter_model.safetensors"),
            "dpo": load_weights(run_dir / "dpo" / "adapter_model.safetensors"),
            "final": load_weights(run_dir / "dpo" / "merged" / "model.safetensors")}


def weight_diff(a: dict, b: dict) -> float | None:
    """Max abs difference over every tensor; None when the tensor names differ."""
    worst = 0.0
    for part in b:
        if set(a[part]) != set(b[part]):
            return None
        worst = max([worst] + [float((a[part][k].float() - b[part][k].float()).abs().max()) for k in b[part]])
    return worst


def step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint and re.search(r"checkpoint-\d+$", checkpoint) else None


def landed(attempts: list[dict], events: dict, t: float, interval: int) -> tuple[str, int | None]:
    """Where the run was when the signal went (the attempt running then, and how far its own events
    had got), and how many steps that attempt still finished after it."""
    running = [a for a in attempts if a["started_at"] <= t and (a["finished_at"] is None or a["finished_at"] >= t)]
    if not running:
        return "between stages", None
    a = running[-1]
    all_events = events.get((a["stage"], a["attempt"]), [])
    seen = [e for e in all_events if e.get("time", 0) <= t]
    after = sum(1 for e in all_events[1:] if e["type"] == "progress" and e.get("time", 0) > t
                and any(p["type"] == "progress" for p in seen))
    stage = a["stage"]
    if any(e["type"] == "validating" for e in seen):
        return f"{stage} gate", after
    if stage == "merge":
        return "merge", after
    progress = [e["step"] for e in seen if e["type"] == "progress"]
    if not progress:
        return f"{stage} setup (loading, tokenizing)", after
    last = progress[-1]
    total = next((e.get("total") for e in seen if e["type"] == "progress"), None)
    saved = {e["step"] for e in seen if e["type"] == "checkpoint"}
    if len(progress) > 1 and (last % interval == 0 or last == total) and last not in saved:
        return f"{stage} saving ckpt-{last}", after
    if last == total:
        return f"{stage} trained, before gate", after
    if len(progress) == 1:
        return f"{stage} step {last + 1} (first)", after
    return f"{stage} after step {last}", after


def analyse(run: Run, reference: dict, ctl_log: Path | None, slurmd_log: Path | None) -> dict:
    from trainpipe.store.ledger import Ledger

    interval = CONFIGS[run.config]["interval"]
    ledger = Ledger(run.db_url)
    try:
        info = ledger.get_run(run.run_id)
        attempts = sorted(ledger.attempts(run.run_id), key=lambda a: a["started_at"])
        jobs = ledger.scheduler_jobs(run.run_id)
        transitions = ledger.transitions(run.run_id)
    finally:
        ledger.close()
    work = run.run_dir / ".work"
    events = {(a["stage"], a["attempt"]): read_events(work / a["stage"] / f"events-{a['attempt']}.jsonl")
              for a in attempts}

    def finished_steps(a: dict) -> list[int]:
        progress = [e["step"] for e in events[(a["stage"], a["attempt"])] if e["type"] == "progress"]
        return progress[1:]  # the first is on_train_begin's

    # Steps trained twice, charged to the last preemption before the attempt that redid them.
    seen: dict[str, set[int]] = {}
    twice = [0] * len(run.preemptions)
    twice_unexplained = 0
    for a in attempts:
        steps = finished_steps(a)
        redo = len(set(steps) & seen.get(a["stage"], set()))
        seen.setdefault(a["stage"], set()).update(steps)
        before = [i for i, p in enumerate(run.preemptions) if p.signalled_at < a["started_at"]]
        if before:
            twice[before[-1]] += redo
        else:
            twice_unexplained += redo

    # Tokenization: an attempt that prepared a dataset an earlier attempt had prepared already.
    prepared: set[str] = set()
    retokenized, prepared_later = [], 0
    first_attempt = {}
    for a in attempts:
        first_attempt.setdefault(a["stage"], a["attempt"])
        actions = {role: d.get("action") for role, d in ((a["metrics"] or {}).get("data") or {}).items()
                   if isinstance(d, dict)}
        for e in events[(a["stage"], a["attempt"])]:
            if e["type"] == "data" and e.get("phase") == "tokenize" and e.get("action") in ("prepared", "reused"):
                actions.setdefault(e["role"], e["action"])
        for role, action in actions.items():
            if action == "prepared":
                if a["attempt"] != first_attempt[a["stage"]]:
                    prepared_later += 1
                if role in prepared:
                    retokenized.append(f"{a['stage']}#{a['attempt']}:{role}")
                prepared.add(role)

    # Executions: launch (slurmd log), ledger claim, first step.
    launches = log_times(slurmd_log, rf"Launching batch job {run.job_id} ")
    requeue_logs = log_times(ctl_log, rf"Requeuing JobId={run.job_id}\b")
    by_restart = {j["restart_count"]: j for j in jobs}
    claims = [by_restart[r]["started_at"] for r in sorted(by_restart)] + [float("inf")]
    executions = []
    for n, restart in enumerate(sorted(by_restart)):
        j = by_restart[restart]
        launch = launches[restart] if restart < len(launches) else None
        start = launch if launch is not None and launch <= j["started_at"] + 0.5 else None
        # The execution's attempts: started after its claim of the run and before the next execution's.
        mine = [a for a in attempts if claims[n] <= a["started_at"] < claims[n + 1]]
        first = mine[0] if mine else None
        step_time, trained_first, began = None, False, None
        worker = None
        for a in mine:
            ev = events[(a["stage"], a["attempt"])]
            progress = [e for e in ev if e["type"] == "progress"]
            if len(progress) > 1:
                step_time = progress[1]["time"]
                trained_first = a is first
                began = progress[0]["time"]
                worker = next((e["time"] for e in ev if e["type"] == "started"), None)
                break
        executions.append({"restart": restart, "launch": start, "claim": j["started_at"], "first": first,
                           "attempt_started": first["started_at"] if first else None, "worker": worker,
                           "began": began, "step": step_time, "resumed_in_training": trained_first,
                           "end_reason": j["end_reason"], "requeued": j["requeued"], "ended_at": j["ended_at"]})

    rows = []
    for i, p in enumerate(run.preemptions):
        where, after = landed(attempts, events, p.signalled_at, interval)
        row = {"aim": p.aim.describe(), "kind": p.kind, "landed": where, "after": after,
               "twice": twice[i], "survivors": len(p.survivors), "note": p.note.strip()}
        hit = next((e for e in executions if e["restart"] == p.restart_before), None)
        nxt = next((e for e in executions if e["restart"] == p.restart_before + 1), None)
        # The next attempt of the interrupted stage: where it resumed.
        stage = row["landed"].split()[0] if row["landed"].split()[0] in STAGES else None
        after = [a for a in attempts if a["started_at"] > p.signalled_at and (stage is None or a["stage"] == stage)]
        row["resumed_from"] = step_of(after[0]["resumed_from"]) if after and stage in ("sft", "dpo") else None
        if p.kind == "warning":
            stop = next((t["at"] for t in transitions if t["trigger"] == "interrupt"
                         and t["at"] >= p.signalled_at), None)
            row["stop_s"] = stop - p.signalled_at if stop else None
            reason = next((t["detail"].get("reason") for t in transitions if t["trigger"] == "interrupt"
                           and t["at"] >= p.signalled_at), None)
            row["recorded"] = f"{hit['end_reason']}{'+requeued' if hit and hit['requeued'] else ''}" if hit else "-"
            if reason and reason != "preempted":
                row["note"] += f" interrupt reason {reason}"
            requested = hit["ended_at"] if hit else None
        else:
            row["stop_s"] = None
            row["recorded"] = hit["end_reason"] if hit else "-"
            requested = p.requeued_at
        row["hold_s"] = None
        row["hold_from_log_s"] = None
        if nxt and nxt["launch"] and requested:
            row["hold_s"] = nxt["launch"] - requested
            logged = [r for r in requeue_logs if requested - 1 <= r <= nxt["launch"]]
            row["hold_from_log_s"] = nxt["launch"] - logged[0] if logged else None
        elif nxt and requested:
            row["hold_s"] = nxt["claim"] - requested
            row["note"] += " (hold to ledger claim: slurmd log unreadable)"
        row["execution"] = nxt
        rows.append(row)

    diff = None
    try:
        diff = weight_diff(final_weights(run.run_dir), reference)
    except (OSError, KeyError) as exc:
        diff = f"missing ({exc.__class__.__name__})"
    return {"run": run, "state": info["state"], "diff": diff, "rows": rows, "executions": executions,
            "twice_unexplained": twice_unexplained, "retokenized": retokenized, "prepared_later": prepared_later,
            "attempts": {s: sum(1 for a in attempts if a["stage"] == s) for s in STAGES}}


# ------------------------------------------------------------------ main


def reference_run(name: str, work: Path, base_env: dict) -> tuple[dict, float]:
    home = work / f"reference-{name}"
    env = {**base_env, "TRAINPIPE_HOME": str(home / "home"), "TRAINPIPE_DB": f"sqlite:///{home / 'ledger.db'}"}
    started = time.perf_counter()
    proc = cli(["run", str(QUICKSTART), "--json", *sets(overrides(home / "out", name))], env, work)
    took = time.perf_counter() - started
    result = first_json(proc.stdout) if "{" in proc.stdout else {}
    if proc.returncode != 0 or result.get("state") != "succeeded":
        raise SystemExit(f"reference run {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return final_weights(Path(result["final_model_path"]).parent.parent), took


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--preemptions", type=int, default=2, help="per run (at most 5: --max-requeues)")
    parser.add_argument("--full", action="store_true", help="12 runs x 3 preemptions")
    parser.add_argument("--configs", default="quickstart,long-sft",
                        help=f"comma-separated, runs alternate between them: {', '.join(CONFIGS)}")
    parser.add_argument("--kill-form", choices=["random", "kill-batch", "kill-full"], default="random",
                        help="scancel --signal=KILL --batch (SIGKILL to `trainpipe run`) or --full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=420, help="seconds per preempted run")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if args.full:
        args.runs, args.preemptions = max(args.runs, 12), max(args.preemptions, 3)
    if not 1 <= args.preemptions <= 5:
        parser.error("--preemptions must be 1..5 (the job requeues itself at most 5 times)")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        raise SystemExit('no Slurm cluster: run `eval "$(.ci/start-slurm --env)"` first (sets SLURM_CONF)')
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if sinfo.returncode != 0 or not sinfo.stdout.strip():
        raise SystemExit(f"the Slurm cluster at {os.environ['SLURM_CONF']} does not answer: {sinfo.stderr.strip()}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="trainpipe-preemption-"))
    work.mkdir(parents=True, exist_ok=True)
    atexit.register(cancel_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    if not (args.workdir or args.keep):
        atexit.register(shutil.rmtree, work, True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINPIPE_")}
    base_env.update({"TRAINPIPE_CACHE": str(work / "model-cache"), "TRAINPIPE_RETRY_BACKOFF_S": "0",
                     "TOKENIZERS_PARALLELISM": "false"})
    ctl_log, slurmd_log = slurm_log_files()
    version = subprocess.run(["sinfo", "-V"], capture_output=True, text=True).stdout.strip()

    print("command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    print(f"resolved: runs {args.runs}, preemptions/run {args.preemptions}, configs {configs}, seed {args.seed}, "
          f"kill form {args.kill_form}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {version}, "
          f"python {platform.python_version()}, {datetime.now().isoformat(timespec='seconds')}")
    print(f"workdir {work}; Slurm logs: {ctl_log if ctl_log and ctl_log.is_file() else '-'}, "
          f"{slurmd_log if slurmd_log and slurmd_log.is_file() else '-'}", flush=True)
    started = time.perf_counter()

    references = {}
    for name in configs:
        references[name], took = reference_run(name, work, base_env)
        print(f"reference {name} ({CONFIGS[name]}): uninterrupted plain run, {took:.1f} s", flush=True)

    rng = random.Random(args.seed)
    deck = deal(args.runs * args.preemptions, args.kill_form, rng)
    results = []
    for index in range(args.runs):
        config = configs[index % len(configs)]
        once_file = work / f"run{index}-fault-fired"
        combos = deck[index * args.preemptions:(index + 1) * args.preemptions]
        aims = plan_run(combos, CONFIGS[config], rng, once_file)
        run = submit(index, config, aims, work, base_env, args)
        print(f"run {index + 1}/{args.runs} {config}: job {run.job_id}, aims: "
              + ", ".join(f"{a.signal} at {a.describe()}" for a in aims), flush=True)
        drive(run, args, once_file)
        result = analyse(run, references[config], ctl_log, slurmd_log)
        results.append(result)
        print(f"    -> {result['state']}, {len(run.preemptions)} preemption(s), job "
              f"{run.final_state.get('JobState', '?')} restarts {run.final_state.get('Restarts', '?')}, "
              f"{run.ended_at - run.submitted_at:.0f} s", flush=True)
    print(f"\ntotal wall {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}\n")

    # ---- per preemption
    print("Per preemption (landed: where the run was at the signal, from the attempt's own events; steps "
          "after: steps that attempt still finished after the signal; job row: how the execution's "
          "scheduler_jobs row ended; twice: "
          "steps trained twice because of it; resumed: the checkpoint step the stage resumed from; stop: "
          "warning -> run recorded interrupted; hold: requeue -> slurmd launch; restart->step: launch -> "
          "first training step of the requeued execution, * = it resumed outside training)")
    rows = []
    for r in results:
        run = r["run"]
        for i, row in enumerate(r["rows"]):
            e = row["execution"]
            to_step = None
            if e and e["step"] is not None and (e["launch"] or e["claim"]):
                to_step = f"{e['step'] - (e['launch'] or e['claim']):.1f}" + ("" if e["resumed_in_training"] else "*")
            rows.append([f"{run.index + 1}.{i + 1}", run.config, row["aim"], row["kind"], row["landed"],
                         row["after"], row["recorded"], row["twice"], row["resumed_from"], row["stop_s"],
                         row["hold_s"], to_step, row["survivors"] or "", row["note"]])
    table(["#", "config", "aimed at", "kind", "landed", "steps after", "job row", "twice", "resumed", "stop s",
           "hold s", "restart->step s", "survivors", "note"], rows)

    # ---- per run
    print("\nPer run")
    rows = []
    for r in results:
        run = r["run"]
        diff = r["diff"]
        identical = diff == 0.0
        rows.append([run.index + 1, run.config, run.job_id, r["state"], run.final_state.get("Restarts", "?"),
                     "/".join(str(r["attempts"][s]) for s in STAGES),
                     "yes" if identical else f"NO ({diff if isinstance(diff, str) else f'max diff {diff}'})",
                     ", ".join(r["retokenized"]) or 0, r["prepared_later"], r["twice_unexplained"],
                     f"{run.ended_at - run.submitted_at:.0f}", "; ".join(a.describe() for a in run.missed)])
    table(["run", "config", "job", "state", "restarts", "attempts sft/merge/dpo", "identical", "re-tokenized",
           "prepared after 1st attempt", "twice w/o preemption", "wall s", "aims not reached"], rows)

    # ---- restart breakdown
    execs = [e for r in results for e in r["executions"] if e["restart"] > 0]
    trained = [e for e in execs if e["resumed_in_training"] and e["step"] is not None and e["launch"]]
    segments = {"launch -> ledger claim": [e["claim"] - e["launch"] for e in trained],
                "claim -> stage attempt": [e["attempt_started"] - e["claim"] for e in trained],
                "attempt -> worker started": [e["worker"] - e["attempt_started"] for e in trained if e["worker"]],
                "worker -> trainer began": [e["began"] - e["worker"] for e in trained if e["worker"]],
                "trainer began -> first step": [e["step"] - e["began"] for e in trained],
                "launch -> first step": [e["step"] - e["launch"] for e in trained]}
    for cfg in configs:
        segments[f"  launch -> first step, {cfg}"] = [
            e["step"] - e["launch"] for r in results if r["run"].config == cfg for e in r["executions"]
            if e["restart"] > 0 and e in trained]
    print(f"\nRequeued executions that resumed inside SFT/DPO: {len(trained)} of {len(execs)}; seconds, "
          "median (min-max)")
    table(["segment", "median", "min", "max", "n"],
          [[k, median(v), min(v) if v else None, max(v) if v else None, len(v)] for k, v in segments.items()])
    firsts = [e for r in results for e in r["executions"] if e["restart"] == 0 and e["launch"] and e["step"]]
    if firsts:
        v = [e["step"] - e["launch"] for e in firsts]
        print(f"for comparison, first executions (fresh job, tokenizes): launch -> first step median "
              f"{median(v):.1f} s (min {min(v):.1f}, max {max(v):.1f}, n {len(v)})")

    # ---- summary
    all_rows = [row for r in results for row in r["rows"]]
    warned = [row for row in all_rows if row["kind"] == "warning"]
    killed = [row for row in all_rows if row["kind"] != "warning"]
    holds = [row["hold_s"] for row in all_rows if row["hold_s"] is not None]
    holds_log = [row["hold_from_log_s"] for row in all_rows if row["hold_from_log_s"] is not None]
    finished = sum(r["state"] == "succeeded" for r in results)
    identical = sum(r["diff"] == 0.0 for r in results)
    twice_w = max((row["twice"] for row in warned), default=0)
    twice_wo = max((row["twice"] for row in killed), default=0)
    intervals = sorted({CONFIGS[c]["interval"] for c in configs})
    over_interval = [row for r in results for row in r["rows"] if row["kind"] != "warning"
                     and row["twice"] > CONFIGS[r["run"].config]["interval"]]
    retok = sum(len(r["retokenized"]) for r in results)
    unexplained = sum(r["twice_unexplained"] for r in results)
    survivors = sum(row["survivors"] for row in all_rows)
    restart = median(segments["launch -> first step"])
    quick = median(segments.get("  launch -> first step, quickstart", []))
    hold = median(holds)
    print("\nSummary (goal in brackets)")
    print(f"  runs finished:               {finished}/{len(results)} [all]")
    print(f"  final weights identical:     {identical}/{len(results)} [all]")
    print(f"  preemptions landed:          {len(all_rows)} ({len(warned)} warned, {len(killed)} killed), "
          f"aims not reached {sum(len(r['run'].missed) for r in results)}")
    print(f"  steps trained twice, warned: total {sum(row['twice'] for row in warned)}, max per preemption "
          f"{twice_w} [0]")
    print(f"  steps trained twice, killed: total {sum(row['twice'] for row in killed)}, max per preemption "
          f"{twice_wo} [<= checkpoint interval {'/'.join(map(str, intervals))}; over it: {len(over_interval)}]")
    print(f"  steps trained twice with no preemption before: {unexplained} [0]")
    overrun = [row["after"] for row in warned if row["after"] is not None]
    print(f"  warned: steps finished after the signal: median {fmt(median(overrun))}, max "
          f"{max(overrun, default=0)}; warning -> run interrupted: median "
          f"{fmt(median([row['stop_s'] for row in warned if row['stop_s'] is not None]))} s")
    print(f"  data re-tokenized:           {retok} [never]")
    print(f"  processes left after a kill: {survivors} [0]")
    print(f"  restart -> first step:       median {fmt(restart)} s over {len(trained)} (quickstart "
          f"{fmt(quick)} s) [<= 10 s on the quickstart]")
    print(f"  scheduler hold:              median {fmt(hold)} s from the requeue request, "
          f"{fmt(median(holds_log))} s from slurmctld's 'Requeuing' (not part of the restart time)")
    print(f"\npreemption: {finished}/{len(results)} finished, {identical}/{len(results)} identical, twice-trained "
          f"steps w/ warning {twice_w}, w/o warning {twice_wo}, re-tokenized {retok}, restart-to-first-step "
          f"median {fmt(restart)} s (hold {fmt(hold)} s)")
    ok = (finished == len(results) and identical == len(results) and twice_w == 0 and not over_interval
          and retok == 0 and unexplained == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
