"""The pre-imported stage worker: `python -m trainpipe.attempt.zygote FD ORCHESTRATOR_PID`.

One per run. It imports torch, transformers, trl, peft and datasets once (imports only: no tensor
op, no CUDA), then forks a fresh child per stage attempt. Each child is still its own process, so
an OOM or a segfault cannot take the orchestrator down and memory is freed between stages, but it
no longer pays ~4-15 s of imports. The child then runs exactly what `python -m
trainpipe.attempt.worker SPEC` runs.

Protocol on the socket FD, one JSON object per line:
    worker -> orchestrator   {"ready": true, "import_s": 4.2}   once, after the imports
    orchestrator -> worker   {"spec": PATH, "log": PATH, "env": {...}}
    worker -> orchestrator   {"pid": N}  or  {"refused": REASON} (the orchestrator then spawns)
    worker -> orchestrator   {"exit": CODE}   when the child ends; CODE as Popen.returncode

Why each property of a stage process still holds:
- process group: the child calls setsid(), so the orchestrator's killpg(pid) reaches the stage
  and everything it started (gate checks), and a terminal Ctrl-C reaches neither worker nor child;
- dying with the orchestrator: this worker has PR_SET_PDEATHSIG tied to the orchestrator (set by the
  supervisor), and each child has it tied to this worker, so a SIGKILLed `trainpipe run` takes both
  down. A child that finds this worker already gone exits at once (the prctl race);
- CUDA: a forked child cannot use CUDA once its parent has initialised the driver (cuInit). This
  worker never touches CUDA: torch's availability checks go through NVML, and the one import that asks
  a GPU something (bitsandbytes: every GPU's compute capability) is answered by a throwaway
  interpreter. Before each fork it checks both `torch.cuda.is_initialized()` and the driver itself,
  and refuses if either is live (the orchestrator then starts a fresh interpreter and records `spawn`);
- OpenMP: GNU OpenMP's thread pool does not survive a fork once it has run a parallel region, so this
  process runs no torch op at all; each child starts its own pool (and reads its thread count) on its
  first op. `OMP_NUM_THREADS` is read when the library loads, so it must be set before `trainpipe run`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

# What the stages and gates import, attribute by attribute: transformers, trl and peft load their
# submodules lazily, on first attribute access, and those submodules are most of the cost.
PRELOAD: dict[str, tuple[str, ...]] = {
    "torch": (),
    "safetensors.torch": (),
    "datasets": ("Dataset",),
    "transformers": ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "TrainerCallback",
                     "PreTrainedModel"),
    "peft": ("LoraConfig", "PeftModel", "get_peft_model"),
    "trl": ("SFTConfig", "SFTTrainer", "DPOConfig", "DPOTrainer"),
    "trainpipe.attempt.worker": (),
    "trainpipe.stages.sft": (),
    "trainpipe.stages.merge": (),
    "trainpipe.stages.dpo": (),
    "trainpipe.validators": (),
    "trainpipe.validators.resources": (),
    "trainpipe.validators.generation": (),
}


IMPORTS_LOGGED = "worker: preloaded the stage libraries in"

# Run by a throwaway interpreter, which may initialise CUDA since nothing forks from it.
CAPABILITY_QUERY = ("import json, torch; print(json.dumps([torch.cuda.get_device_capability(i) "
                    "for i in range(torch.cuda.device_count())]))")
CAPABILITY_QUERY_TIMEOUT_S = 120
CUDA_ERROR_NOT_INITIALIZED = 3


def preload() -> None:
    # A plain torch.cuda.is_available() calls cudaGetDeviceCount, which initialises the driver and
    # leaves a forked child without CUDA (torch docs, "poison fork"); the NVML-based check does not.
    # transformers, peft and bitsandbytes all ask it at import time.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    with _capability_answered_elsewhere(torch):
        for module_name, attributes in PRELOAD.items():
            module = importlib.import_module(module_name)
            for attribute in attributes:
                getattr(module, attribute)


@contextlib.contextmanager
def _capability_answered_elsewhere(torch: Any) -> Iterator[None]:
    """While the imports run, torch.cuda.get_device_capability(i) is answered by another interpreter.

    bitsandbytes asks every GPU's compute capability when it is imported (to pick its CUDA library),
    and torch initialises CUDA to answer. The query starts now, so it runs beside the imports; if it
    fails, the real function answers, CUDA is initialised here, and every attempt is spawned instead
    (fork_unsafe_reason says why)."""
    if torch.cuda.device_count() == 0:  # also a CPU-only build of torch
        yield
        return
    query = subprocess.Popen([sys.executable, "-c", CAPABILITY_QUERY], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    real = torch.cuda.get_device_capability
    answers: list[tuple[int, int]] | None = None

    def answered(device: Any = None) -> tuple[int, int]:
        nonlocal answers
        if answers is None:
            answers = _read_capabilities(query)
        index = device.idx if isinstance(device, torch.cuda.device) else device
        if isinstance(index, int) and 0 <= index < len(answers):
            return answers[index]
        return real(device)  # the current device (None) or an unexpected one: only torch knows

    torch.cuda.get_device_capability = answered
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real
        if query.poll() is None:
            query.kill()
        query.wait()


def _read_capabilities(query: subprocess.Popen) -> list[tuple[int, int]]:
    try:
        out, _ = query.communicate(timeout=CAPABILITY_QUERY_TIMEOUT_S)
        if query.returncode == 0:
            return [(int(major), int(minor)) for major, minor in json.loads(out.strip().splitlines()[-1])]
    except (subprocess.TimeoutExpired, ValueError, IndexError, TypeError):
        pass
    return []


def cuda_driver_initialised() -> bool:
    """Whether this process has called cuInit, by any route: torch.cuda.is_initialized() only knows
    torch's own lazy init. Before cuInit the driver answers every call with CUDA_ERROR_NOT_INITIALIZED,
    and asking it so does not initialise it."""
    try:
        # RTLD_NOLOAD: only a libcuda this process already loaded; none loaded means no cuInit.
        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


def fork_unsafe_reason() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the pre-imported worker, and a forked child could not use it"
    if cuda_driver_initialised():
        return "the CUDA driver is initialised in the pre-imported worker, and a forked child could not use it"
    if '"refuse_fork"' in os.environ.get("TRAINPIPE_FAULT", ""):
        return "refused by TRAINPIPE_FAULT (test hook standing in for an initialised CUDA)"
    return None


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.sendall((json.dumps(message) + "\n").encode())


def _die_with(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[1]))
    orchestrator = int(argv[2])
    # The supervisor set PR_SET_PDEATHSIG for this process; it may have died before that applied.
    if os.getppid() != orchestrator:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    preload()
    # Move everything imported so far out of the collector's reach (Python docs, gc.freeze): a child's
    # collections then neither walk ~4,000 modules' objects nor copy their pages on write.
    gc.freeze()
    import_s = round(time.perf_counter() - started, 2)
    # Into the run's .work/worker.log: benchmarks/overhead.py separates these imports, which any
    # training script pays, from trainpipe's own overhead.
    print(f"{IMPORTS_LOGGED} {import_s:.2f} s", flush=True)
    _send(channel, {"ready": True, "import_s": import_s})
    requests = channel.makefile("r", encoding="utf-8")
    for line in requests:
        request = json.loads(line)
        reason = fork_unsafe_reason()
        if reason:
            _send(channel, {"refused": reason})
            continue
        # Anything buffered here would be written again by the child into the stage log.
        sys.stdout.flush()
        sys.stderr.flush()
        worker_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(request, channel, requests, worker_pid)
        _send(channel, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send(channel, {"exit": os.waitstatus_to_exitcode(status)})
    return 0  # the orchestrator closed the channel: the run is over


def _child(request: dict[str, Any], channel: socket.socket, requests: io.TextIOBase, worker_pid: int) -> None:
    """The stage attempt, in the forked child; never returns."""
    code = 1
    try:
        requests.close()
        channel.close()  # only the worker answers the orchestrator; its EOF must mean the worker is gone
        os.setsid()
        _die_with(worker_pid)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        # Unbuffered, as PYTHONUNBUFFERED makes the spawned worker: a killed stage loses no log line.
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["trainpipe.attempt.worker", request["spec"]]
        from trainpipe.attempt import worker

        code = worker.main(sys.argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the stage log; the exit code says it failed
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            # Not sys.exit: the child must not run the worker's atexit handlers or unwind into its loop.
            os._exit(code)


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # The run waits for this process to end: skip the interpreter's teardown of torch & co. (~0.5 s),
    # there is nothing left to clean up that the OS does not.
    os._exit(code)
