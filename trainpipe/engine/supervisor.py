"""Runs one stage attempt in a child process and watches it: events, heartbeats, timeout, signals."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _die_with_parent() -> None:
    # If the orchestrator is SIGKILLed, its stage must not train on unobserved: PR_SET_PDEATHSIG.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


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
              on_tick: Callable[[], None], on_start: Callable[[int], None] | None = None,
              stop_requested: Callable[[], bool] = lambda: False) -> ChildOutcome:
    """Start the worker, pump its events, enforce the timeout; return how it ended."""
    result_path.unlink(missing_ok=True)
    tail = _EventTail(events_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        # A new session makes the stage its own process group: a timeout kills the whole group,
        # and a Ctrl-C in the terminal reaches only the orchestrator, which then asks it to stop.
        proc = subprocess.Popen([sys.executable, "-m", "trainpipe.stages.worker", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent, env=env)
    if on_start:
        on_start(proc.pid)
    started = time.monotonic()
    last_beat = 0.0
    timed_out = interrupted = False
    term_sent_at: float | None = None
    while proc.poll() is None:
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
                _signal_group(proc.pid, signal.SIGTERM)
            elif stop_requested():
                interrupted = True
                term_sent_at = now
                _signal_group(proc.pid, signal.SIGTERM)
        elif now - term_sent_at > TERM_GRACE_S:
            _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(POLL_S)
    for event in tail.read():
        on_event(event)
    code = proc.returncode
    if timed_out:
        return ChildOutcome(False, "timed_out", code, f"timed out after {timeout_s:.0f} s")
    result: dict[str, Any] = {}
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if result.get("ok"):
        return ChildOutcome(True, "ok", code, result=result)
    if interrupted or result.get("kind") == "preempted":
        return ChildOutcome(False, "interrupted", code, result.get("error") or "stopped on request")
    if result:
        return ChildOutcome(False, result.get("kind", "error"), code, result.get("error"), result)
    if code is not None and code < 0:
        return ChildOutcome(False, "killed", code, f"stage process killed by {signal.Signals(-code).name}")
    return ChildOutcome(False, "no_result", code, f"stage process exited with {code} and no result; see {log_path}")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
