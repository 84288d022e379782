"""Watches one stage attempt's process (started by stage_process.py): its events, heartbeats, timeout
and signals, and what its end means (a result, a crash, an OOM, a timeout, a dead torchrun rank).
It never imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.engine.stage_process import StageProcess, StageWorkers, Torchrun
from trainpipe.failures import kind_of

POLL_S = 0.2
HEARTBEAT_S = 2.0
TERM_GRACE_S = float(os.environ.get("TRAINPIPE_TERM_GRACE_S", "30"))


@dataclass
class ChildOutcome:
    ok: bool
    kind: str                  # how it ended: ok, interrupted, timed_out, killed, no_result, or the worker's
                               # cause (oom, io, user, bug; trainpipe/failures.py)
    exit_code: int | None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def error_kind(self) -> str | None:
        """user, transient or bug; None for a success or a stop on request."""
        if self.ok or self.kind == "interrupted":
            return None
        return self.result.get("error_kind") or kind_of(self.kind)

    @property
    def traceback(self) -> str | None:
        return self.result.get("traceback")


class _EventTail:
    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
            self.offset = handle.tell()
        text = self.partial + chunk
        lines = text.split("\n")
        self.partial = lines.pop()  # an incomplete last line waits for the next read
        return [json.loads(line) for line in lines if line.strip()]


def run_child(spec_path: Path, *, events_path: Path, result_path: Path, log_path: Path,
              timeout_s: float | None, on_event: Callable[[dict[str, Any]], None],
              on_tick: Callable[[], None], on_start: Callable[[int, str], None] | None = None,
              stop_requested: Callable[[], bool] = lambda: False,
              workers: StageWorkers | None = None, launcher: dict[str, Any] | None = None) -> ChildOutcome:
    """Start the stage attempt, pump its events, enforce the timeout; return how it ended. With a
    `launcher` (a stage's LauncherSettings as a dict) the attempt runs under torchrun; never forked
    from the pre-imported worker, whose one process cannot be a rank of several."""
    result_path.unlink(missing_ok=True)
    for stale in result_path.parent.glob(f"{result_path.stem}.rank*.json"):
        stale.unlink(missing_ok=True)
    tail = _EventTail(events_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    if launcher:
        proc: StageProcess = Torchrun(launcher, spec_path, log_path, env)
    else:
        proc = (workers or StageWorkers(log_path, mode="spawn")).start(spec_path, log_path, env)
    reported_pid = False
    last_beat = 0.0
    timed_out = interrupted = False
    term_sent_at: float | None = None
    while (code := proc.poll()) is None:
        if not reported_pid and proc.pid is not None:
            reported_pid = True
            if on_start:
                on_start(proc.pid, proc.worker)
        for event in tail.read():
            on_event(event)
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_S:
            on_tick()
            last_beat = now
        if term_sent_at is None:
            if timeout_s is not None and now - started > timeout_s:
                timed_out = True
                term_sent_at = now
                proc.signal_group(signal.SIGTERM)
            elif stop_requested():
                interrupted = True
                term_sent_at = now
                proc.signal_group(signal.SIGTERM)
        elif now - term_sent_at > TERM_GRACE_S:
            proc.signal_group(signal.SIGKILL)
        time.sleep(POLL_S)
    if not reported_pid and proc.pid is not None and on_start:
        on_start(proc.pid, proc.worker)
    for event in tail.read():
        on_event(event)
    if timed_out:
        return ChildOutcome(False, "timed_out", code, f"timed out after {timeout_s:.0f} s")
    result: dict[str, Any] = {}
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if launcher and not result.get("ok") and code != 0:
        result = _torchrun_result(result, result_path, code, log_path)
    if result.get("ok"):
        return ChildOutcome(True, "ok", code, result=result)
    if interrupted or result.get("kind") == "preempted":
        return ChildOutcome(False, "interrupted", code, result.get("error") or "stopped on request")
    if result:
        return ChildOutcome(False, result.get("kind", "error"), code, result.get("error"), result)
    if code is not None and code < 0:
        return ChildOutcome(False, "killed", code, f"stage process killed by {signal.Signals(-code).name}")
    from trainpipe.diskspace import full_disk_message, write_refusal

    refusal = write_refusal(result_path.parent)
    if refusal is not None:
        # The stage failed on a full disk and could not even write why; the disk answers instead.
        error = full_disk_message(result_path.parent, refusal[1]) + f" (the stage process exited with {code})"
        return ChildOutcome(False, "disk", code, error, {"error_kind": kind_of("disk"), "error": error})
    return ChildOutcome(False, "no_result", code, f"stage process exited with {code} and no result; see {log_path}")


def _torchrun_result(rank0: dict[str, Any], result_path: Path, code: int | None,
                     log_path: Path) -> dict[str, Any]:
    """What a failed torchrun attempt ended with. The rank that failed first holds the cause; the
    others then fail in a collective (their peer is gone) or are stopped by torchrun. A rank other
    than 0 that raised wrote result-N.rankR.json; one that was killed wrote nothing."""
    if rank0.get("kind") == "preempted":
        return rank0
    for path in sorted(result_path.parent.glob(f"{result_path.stem}.rank*.json")):
        other = json.loads(path.read_text(encoding="utf-8"))
        if other.get("kind") and other.get("kind") != "peer_lost":
            rank = path.name.rsplit(".rank", 1)[1].split(".")[0]
            return {**other, "error": f"rank {rank}: {other.get('error')}"}
    if rank0 and rank0.get("kind") != "peer_lost":
        return rank0
    # No rank says why: one was killed (a signal, the OOM killer), and the others lost it as a peer.
    # A transient failure, like a killed single-process stage: retried from the newest checkpoint.
    return {"ok": False, "kind": "killed", "error_kind": kind_of("killed"),
            "error": f"a rank of the torchrun stage died{_root_cause(log_path)}; torchrun exited with {code} "
                     f"(see {log_path})"}


def _root_cause(log_path: Path) -> str:
    """The rank that failed first, from torchrun's summary at the end of the stage log:
    ' (rank 1, exit code -9, SIGKILL)', or '' if it printed none.

    torchrun's "Root Cause" is the failure with the earliest timestamp, in whole seconds: a rank that
    was killed and the peer that then exited with an error usually tie, and torchrun names either. A
    rank ended by a signal is the cause here (its peers only lost it), so it wins over torchrun's pick."""
    import re

    try:
        with log_path.open("rb") as handle:
            handle.seek(max(0, log_path.stat().st_size - 16384))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    root_at = tail.rfind("Root Cause")
    if root_at < 0:
        return ""
    # torchrun prints "Failures:" (the other ranks), then "Root Cause", once per failed run.
    failures_at = tail.rfind("Failures:", 0, root_at)
    entry = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?[ \t]*$",
                       re.DOTALL | re.MULTILINE)
    entries = list(entry.finditer(tail, failures_at if failures_at >= 0 else root_at))
    root = next((m for m in entries if m.start() > root_at), None)
    if root is None:
        return ""
    signalled = [m for m in entries if int(m.group(2)) < 0]
    rank, exit_code, sig = min(signalled, key=lambda m: int(m.group(1))).groups() if signalled else root.groups()
    return f" (rank {rank}, exit code {exit_code}{', ' + sig if sig else ''})"
