"""Helpers for the end-to-end tests: read real weights, drive the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trainpipe.store.ledger import Ledger


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    shared = set(a) & set(b)
    assert shared, "no tensors in common"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in shared)


def cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_json(*args: str):
    proc = cli(*args, "--json", check=True)
    return json.loads(proc.stdout)


def wait_for(predicate, timeout: float = 300, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stage_states(db_url: str, run_id: str) -> dict[str, str]:
    ledger = Ledger(db_url)
    try:
        return {s["name"]: s["state"] for s in ledger.stages(run_id)}
    finally:
        ledger.close()


def only_run_id(db_url: str) -> str | None:
    ledger = Ledger(db_url)
    try:
        runs = ledger.list_runs(limit=None)
    finally:
        ledger.close()
    return runs[0]["run_id"] if runs else None


def start_run(config: Path, overrides: list[str], fault: dict | None = None, db: str | None = None) -> subprocess.Popen:
    """`trainpipe run` as a real background process, optionally with a TRAINPIPE_FAULT and `--db`."""
    env = os.environ.copy()
    if fault:
        env["TRAINPIPE_FAULT"] = json.dumps(fault)
    args = [arg for override in overrides for arg in ("--set", override)] + (["--db", db] if db else [])
    return subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def final_weights(run_dir: Path) -> dict:
    """SFT adapter, DPO adapter and the final merged model of a run."""
    return {
        "sft": load_weights(run_dir / "sft" / "adapter_model.safetensors"),
        "dpo": load_weights(run_dir / "dpo" / "adapter_model.safetensors"),
        "final": load_weights(run_dir / "dpo" / "merged" / "model.safetensors"),
    }


def assert_identical(a: dict, b: dict) -> None:
    for part in a:
        assert set(a[part]) == set(b[part]), part
        worst = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
        assert worst == 0.0, f"{part}: max abs diff {worst}"


def assert_transitions_gap_free(ledger: Ledger, run_id: str) -> None:
    """Every transition starts where the previous one of the same run or stage ended."""
    last: dict = {}
    for t in ledger.transitions(run_id):
        key = t["stage"]
        if key in last:
            assert t["from_state"] == last[key], f"{key or 'run'}: {last[key]} then {t['from_state']}->{t['to_state']}"
        last[key] = t["to_state"]


def trainer_steps(run_dir: str | Path, stage: str, attempt: int) -> tuple[int, list[int]]:
    """What the trainer of one attempt did, from its own callbacks (the attempt's events file): the
    global step its state held when training began (a restored checkpoint's step, or 0), and the
    steps it then finished, in order."""
    events = Path(run_dir) / ".work" / stage / f"events-{attempt}.jsonl"
    progress = [json.loads(line)["step"] for line in events.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["type"] == "progress"]
    assert progress, f"{events}: the trainer reported no step"
    # The first `progress` is on_train_begin's; every later one is an on_step_end.
    return progress[0], progress[1:]


def assert_continued_from_checkpoint(ledger: Ledger, run_id: str, stage: str, attempt: dict | None = None, *,
                                     trains: bool = True) -> int:
    """The attempt (default: the stage's last) trained on from the checkpoint it was given: its trainer
    began at the checkpoint's step, as the checkpoint's trainer_state.json records it, and its first
    finished step is the next one, not step 1. Labels (resumed_from) only say what was asked.
    `trains=False`: the checkpoint may be the stage's last step, so no step is left to train."""
    attempt = attempt or ledger.attempts(run_id, stage)[-1]
    resumed_from = attempt["resumed_from"]
    assert resumed_from, f"{stage} attempt {attempt['attempt']} was given no checkpoint"
    state_file = Path(resumed_from) / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    checkpoint_step, max_steps = state["global_step"], state["max_steps"]
    assert checkpoint_step > 0
    began_at, finished = trainer_steps(ledger.get_run(run_id)["run_dir"], stage, attempt["attempt"])
    assert began_at == checkpoint_step, f"{stage}: trainer began at step {began_at}, checkpoint is {checkpoint_step}"
    assert finished or not trains, f"{stage}: the resumed trainer finished no step"
    assert finished == list(range(checkpoint_step + 1, checkpoint_step + 1 + len(finished))), (
        f"{stage}: after checkpoint-{checkpoint_step} the trainer finished steps {finished}")
    # A checkpoint at the last step leaves nothing to train: one more step would move the weights
    # under any schedule whose learning rate is not zero there.
    assert not finished or finished[-1] <= max_steps, (
        f"{stage}: the trainer went on past max_steps {max_steps} (finished steps {finished})")
    return checkpoint_step


def assert_every_resume_continued(ledger: Ledger, run_id: str) -> int:
    """Every SFT/DPO attempt that was given a checkpoint began there (see assert_continued_from_checkpoint);
    returns how many were."""
    resumed = [a for a in ledger.attempts(run_id) if a["stage"] in ("sft", "dpo") and a["resumed_from"]]
    for attempt in resumed:
        assert_continued_from_checkpoint(ledger, run_id, attempt["stage"], attempt, trains=False)
    return len(resumed)


def attempts_per_stage(ledger: Ledger, run_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for attempt in ledger.attempts(run_id):
        counts[attempt["stage"]] = counts.get(attempt["stage"], 0) + 1
    return counts


def passed_stage_attempts(ledger: Ledger, run_id: str) -> dict[str, int]:
    """The stages that had passed, with their attempt counts: a resume must never run them again."""
    passed = {s["name"] for s in ledger.stages(run_id) if s["state"] in ("passed", "cached")}
    return {stage: n for stage, n in attempts_per_stage(ledger, run_id).items() if stage in passed}


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p for p in found if process_alive(p)}


def started_pid(run_dir: str | Path, stage: str, attempt: int) -> int | None:
    """The pid the stage process wrote into its own events file when it started."""
    events = Path(run_dir) / ".work" / stage / f"events-{attempt}.jsonl"
    if not events.is_file():
        return None
    for line in events.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["type"] == "started":
            return int(event["pid"])
    return None
