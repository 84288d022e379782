"""How a stage attempt's process starts. It is forked from the run's pre-imported stage worker
(attempt/zygote.py) when it can be, so it does not pay the torch/transformers/trl imports again;
otherwise it is a fresh interpreter, `python -m trainpipe.attempt.worker SPEC`. `StageWorkers` decides
which, and the ledger records it per attempt (`stage_attempts.worker`: fork or spawn). A stage with a
`launcher` runs under torchrun instead (`Torchrun`): torch.distributed's own launcher starts one
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
from pathlib import Path
from typing import Any

WORKER_ENV = "TRAINPIPE_WORKER"  # "fork" (the default on Linux) or "spawn" (a fresh interpreter per attempt)


def _die_with_parent() -> None:
    # If the orchestrator is SIGKILLed, its stage must not train on unobserved: PR_SET_PDEATHSIG.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


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
        signal_group(self._proc.pid, sig)


def torchrun_command(launcher: dict[str, Any], spec_path: Path, node_rank: int = 0,
                     master: tuple[str, str] | None = None) -> list[str]:
    """torch.distributed.run (what the `torchrun` script runs) with the stage worker as its module.
    `node_rank` is 0 for the orchestrator's node and 1..nnodes-1 for `trainpipe join` on the others;
    `master` (host, port) replaces the launcher's rdzv_endpoint (inside a Slurm allocation)."""
    from trainpipe.engine.identity import nproc_per_node

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
        host, port = master or str(launcher["rdzv_endpoint"]).rsplit(":", 1)
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
    reaches every rank, and its exit code is non-zero if any rank failed.

    A multi-node stage inside a Slurm allocation with a task per node is started on every node by
    `srun` (one task per node, each running this module's `--slurm-task`, which turns the task's
    SLURM_PROCID into torchrun's node rank): nobody starts `trainpipe join`. srun forwards SIGTERM to
    its tasks, and Slurm ends them all when srun is killed."""

    worker = "torchrun"

    def __init__(self, launcher: dict[str, Any], spec_path: Path, log_path: Path, env: dict[str, str],
                 node_rank: int = 0):
        command = slurm_command(launcher, spec_path, env) if node_rank == 0 else None
        super().__init__(spec_path, log_path, env,
                         command=command or torchrun_command(launcher, spec_path, node_rank))


def slurm_tasks(env: dict[str, str]) -> int:
    """Tasks of the Slurm allocation this process runs in (0 outside one)."""
    if not env.get("SLURM_JOB_ID"):
        return 0
    for key in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 1


def slurm_command(launcher: dict[str, Any], spec_path: Path, env: dict[str, str]) -> list[str] | None:
    """`srun` starting the stage's torchrun once per node of the allocation, or None when the stage
    spans one node or the allocation has fewer tasks than the stage has nodes (then the stage's
    rdzv_endpoint and `trainpipe join` on the other nodes, as without a scheduler)."""
    nnodes = int(launcher.get("nnodes") or 1)
    if nnodes <= 1 or slurm_tasks(env) < nnodes:
        return None
    command = ["srun", f"--ntasks={nnodes}", "--kill-on-bad-exit=1", "--export=ALL",
               f"--job-name=trainpipe-{spec_path.parent.name}"]
    if int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1) >= nnodes:
        command += [f"--nodes={nnodes}", "--ntasks-per-node=1"]
    return command + [sys.executable, "-m", "trainpipe.engine.stage_process", "--slurm-task", str(spec_path)]


def _slurm_master(launcher: dict[str, Any], spec: dict[str, Any]) -> tuple[str, str]:
    """Where a Slurm task's torchrun meets the others: the allocation's first host, and the port of
    the stage's rdzv_endpoint, else one derived from the job and the attempt (two attempts of one job
    in quick succession must not meet a port still in TIME_WAIT)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "localhost"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    host = hosts[0] if hosts else nodelist.split(",")[0]
    if launcher.get("rdzv_endpoint"):
        return host, str(launcher["rdzv_endpoint"]).rsplit(":", 1)[1]
    job = int("".join(c for c in os.environ.get("SLURM_JOB_ID", "0") if c.isdigit()) or 0)
    return host, str(20000 + (job * 37 + int(spec.get("attempt") or 1)) % 20000)


def _slurm_task(spec_path: Path) -> None:
    """One task of the srun above: this node's torchrun, node rank = the task's rank."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    launcher = spec["config"][spec["stage"]]["launcher"]
    node_rank = int(os.environ.get("SLURM_PROCID") or os.environ.get("SLURM_NODEID") or 0)
    command = torchrun_command(launcher, spec_path, node_rank, master=_slurm_master(launcher, spec))
    os.execv(command[0], command)


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
            signal_group(self.pid, sig)
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
            signal_group(self._proc.pid, signal.SIGKILL)
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
                signal_group(self._proc.pid, signal.SIGKILL)
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


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--slurm-task":
        _slurm_task(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m trainpipe.engine.stage_process --slurm-task SPEC")
