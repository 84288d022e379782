"""Runs one stage attempt in a child process and watches it: events, heartbeats, timeout, signals.

A stage attempt's process is forked from the run's pre-imported stage worker (attempt/zygote.py) when
it can be, so it does not pay the torch/transformers/trl imports again; otherwise it is a fresh
interpreter, `python -m trainpipe.attempt.worker SPEC`, as before. `StageWorkers` decides which, and
the ledger records it per attempt (`stage_attempts.worker`: fork or spawn). A stage with a
`launcher` runs under torchrun instead (`torchrun`): torch.distributed's own launcher starts one
worker per rank. This module only starts and signals processes: it never imports torch.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
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


WORKER_ENV = "TRAINPIPE_WORKER"  # "fork" (the default on Linux) or "spawn" (a fresh interpreter per attempt)


def worker_mode() -> str:
    """TRAINPIPE_WORKER, checked: the run driver calls this before it writes anything."""
    mode = os.environ.get(WORKER_ENV) or "fork"
    if mode not in ("fork", "spawn"):
        from trainpipe.errors import ConfigError

        raise ConfigError(f"{WORKER_ENV}={mode!r} is not a worker mode", hint="use fork (the default) or spawn")
    return mode


class StageProcess:
    """One stage attempt's process, however it was started. `pid` is None until the process exists."""

    pid: int | None
    worker: str

    def poll(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal), else None."""
        raise NotImplementedError

    def signal_group(self, sig: int) -> None:
        raise NotImplementedError


class _Spawned(StageProcess):
    worker = "spawn"

    def __init__(self, spec_path: Path, log_path: Path, env: dict[str, str], command: list[str] | None = None):
        with log_path.open("ab") as log:
            # A new session makes the stage its own process group: a timeout kills the whole group,
            # and a Ctrl-C in the terminal reaches only the orchestrator, which then asks it to stop.
            self._proc = subprocess.Popen(command or [sys.executable, "-m", "trainpipe.attempt.worker", str(spec_path)],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=_die_with_parent, env=env)
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        return self._proc.poll()

    def signal_group(self, sig: int) -> None:
        _signal_group(self._proc.pid, sig)


def torchrun_command(launcher: dict[str, Any], spec_path: Path, node_rank: int = 0) -> list[str]:
    """torch.distributed.run (what the `torchrun` script runs) with the stage worker as its module.
    `node_rank` is 0 for the orchestrator's node and 1..nnodes-1 for `trainpipe join` on the others."""
    from trainpipe.engine.lineage import nproc_per_node

    nnodes = int(launcher.get("nnodes") or 1)
    command = [sys.executable, "-m", "torch.distributed.run",
               "--nproc_per_node", str(nproc_per_node(launcher)), "--nnodes", str(nnodes),
               # A rank that dies fails the attempt; the orchestrator's retry resumes from the newest
               # verified checkpoint, where torchrun's own restart would start training over.
               "--max_restarts", "0"]
    if nnodes > 1:
        # Static rendezvous at node 0, with node ranks given, not drawn: c10d numbers nodes in an
        # order of its own, and global rank 0 (which writes the result and runs the gate) must live
        # on the orchestrator's node, whose torchrun then cannot exit before that rank is done.
        host, port = str(launcher["rdzv_endpoint"]).rsplit(":", 1)
        command += ["--node_rank", str(node_rank), "--master_addr", host, "--master_port", port]
    elif launcher.get("rdzv_endpoint"):
        command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", str(launcher["rdzv_endpoint"])]
    else:
        # Single node: rendezvous on a free localhost port, so concurrent runs never collide.
        command += ["--standalone"]
    return command + ["-m", "trainpipe.attempt.worker", str(spec_path)]


class Torchrun(_Spawned):
    """torchrun and its ranks. torchrun is the process group leader here; it starts each rank in a
    session of its own and forwards SIGTERM/SIGINT to them (then SIGKILL after its 30 s), and each
    rank dies with torchrun (stages/distributed.py: die_with_launcher). So signalling this group
    reaches every rank, and its exit code is non-zero if any rank failed."""

    worker = "torchrun"

    def __init__(self, launcher: dict[str, Any], spec_path: Path, log_path: Path, env: dict[str, str],
                 node_rank: int = 0):
        super().__init__(spec_path, log_path, env, command=torchrun_command(launcher, spec_path, node_rank))


class _Forked(StageProcess):
    """A child of the pre-imported worker, which reaps it and reports its exit code. If the worker
    refuses to fork, the attempt is spawned instead, and this object stands for that process."""

    worker = "fork"

    def __init__(self, workers: StageWorkers, spec_path: Path, log_path: Path, env: dict[str, str]):
        self._workers = workers
        self._respawn = (spec_path, log_path, env)
        self._spawned: _Spawned | None = None
        self._code: int | None = None
        self.pid = None

    def _pump(self) -> None:
        while self._code is None and self._spawned is None:
            message = self._workers.receive()
            if message is None:
                return
            if message.get("gone") and self.pid is not None:
                # The worker died mid-stage; its PR_SET_PDEATHSIG took the child with it.
                self._code = -signal.SIGKILL
            elif message.get("gone") or "refused" in message:
                self._workers.fall_back(message.get("refused") or "the pre-imported worker exited before it "
                                        f"could fork (see {self._workers.log_path})")
                self._spawned = _Spawned(*self._respawn)
                self.pid, self.worker = self._spawned.pid, self._spawned.worker
            elif "pid" in message:
                self.pid = int(message["pid"])
            elif "exit" in message:
                self._code = int(message["exit"])

    def poll(self) -> int | None:
        self._pump()
        return self._spawned.poll() if self._spawned is not None else self._code

    def signal_group(self, sig: int) -> None:
        if self.pid is not None:
            _signal_group(self.pid, sig)
        elif self._code is None:  # still waiting for the worker's imports: the attempt ends unstarted
            self._workers.kill()
            self._code = -sig


class StageWorkers:
    """Starts the stage attempts of one run: forked from one pre-imported worker process where fork is
    safe, else (non-Linux, TRAINPIPE_WORKER=spawn, or the worker refuses because CUDA is initialised
    in it) as a fresh interpreter. Use as a context manager; leaving it ends the worker."""

    def __init__(self, log_path: Path, mode: str | None = None):
        self.log_path = log_path
        mode = mode or worker_mode()
        self.fallback_reason: str | None = None
        if mode == "fork" and not (sys.platform == "linux" and hasattr(os, "fork")):
            mode, self.fallback_reason = "spawn", f"fork is not used on {sys.platform}"
        self.mode = mode
        self._proc: subprocess.Popen | None = None
        self._channel: socket.socket | None = None
        self._buffer = b""
        self.import_s: float | None = None

    def __enter__(self) -> StageWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, spec_path: Path, log_path: Path, env: dict[str, str]) -> StageProcess:
        """Ask for the attempt's process; returns at once. In fork mode its pid is known once the
        worker (started here on first use, ~4-15 s of imports) has forked it. Only here: a run whose
        stages all come from the cache never starts it, so it imports no torch, its children included."""
        if self.mode == "spawn":
            return _Spawned(spec_path, log_path, env)
        if self._proc is None or self._proc.poll() is not None:
            self._start_worker(env)
        assert self._channel is not None
        self._channel.sendall((json.dumps({"spec": str(spec_path), "log": str(log_path), "env": env}) + "\n")
                              .encode())
        return _Forked(self, spec_path, log_path, env)

    def fall_back(self, reason: str) -> None:
        """Spawn every later attempt of this run: what made fork unsafe (CUDA) does not go away."""
        self.mode, self.fallback_reason = "spawn", reason
        self.close()

    def _start_worker(self, env: dict[str, str]) -> None:
        self.close()
        with self.log_path.open("ab") as log:
            self._proc, self._channel = _launch_worker(log, env)
        self._buffer = b""

    def receive(self) -> dict[str, Any] | None:
        """The worker's next message if one has arrived; {"gone": True} once it has exited."""
        if self._channel is None:
            return {"gone": True}
        while b"\n" not in self._buffer:
            if not select.select([self._channel], [], [], 0)[0]:
                return None
            chunk = self._channel.recv(65536)
            if not chunk:
                self.close()
                return {"gone": True}
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if message.get("ready"):
            self.import_s = message.get("import_s")
            return self.receive()
        return message

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        """End the worker: the closed channel is its signal to exit."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            self._proc = None


def _launch_worker(log: Any, env: dict[str, str]) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainpipe.attempt.zygote", str(theirs.fileno()), str(os.getpid())],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
        start_new_session=True, preexec_fn=_die_with_parent, env=env)
    theirs.close()
    ours.setblocking(False)
    return proc, ours


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


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
