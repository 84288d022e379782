"""The pre-imported stage worker: attempts are forked from it, the ledger says so, TRAINPIPE_WORKER=spawn
falls back to a fresh interpreter, and a SIGKILLed orchestrator takes the worker and the stage down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides
from helpers import only_run_id, start_run, wait_for

import trainpipe
from trainpipe.engine.liveness import pid_alive
from trainpipe.store.ledger import Ledger

pytestmark = pytest.mark.slow


def _sft_only(tmp_path: Path) -> list[str]:
    return fast_overrides(tmp_path / "out") + ["sft.max_steps=4", "stages.merge.enabled=false",
                                               "stages.dpo.enabled=false"]


def _started_events(run_dir: str, stage: str) -> list[dict]:
    events = Path(run_dir) / ".work" / stage / "events-1.jsonl"
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "started"]


def test_stage_attempt_runs_in_a_forked_worker(tmp_path: Path, db_url: str, monkeypatch) -> None:
    monkeypatch.delenv("TRAINPIPE_WORKER", raising=False)

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path))

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "fork"
    (started,) = _started_events(result.run_dir, "sft")
    # The child found the libraries already imported, and the ledger has its pid, not the worker's.
    assert started["preloaded"] is True and started["pid"] == attempt["pid"] != os.getpid()


def test_worker_spawn_env_falls_back_to_a_fresh_interpreter(tmp_path: Path, db_url: str, monkeypatch) -> None:
    monkeypatch.setenv("TRAINPIPE_WORKER", "spawn")

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path))

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "spawn"
    (started,) = _started_events(result.run_dir, "sft")
    assert started["preloaded"] is False and started["pid"] == attempt["pid"]
    assert not (Path(result.run_dir) / ".work" / "worker.log").exists(), "no pre-imported worker was started"


@pytest.mark.extended  # CI's budget: `make matrix` runs it
def test_worker_that_refuses_to_fork_falls_back_and_says_so(tmp_path: Path, db_url: str, monkeypatch) -> None:
    """What happens on a GPU box whose worker has CUDA initialised, simulated by a test hook."""
    from trainpipe.engine.observer import Observer

    notes: list[str] = []

    class Notes(Observer):
        def note(self, text: str) -> None:
            notes.append(text)

    monkeypatch.delenv("TRAINPIPE_WORKER", raising=False)
    monkeypatch.setenv("TRAINPIPE_FAULT", json.dumps({"action": "refuse_fork"}))

    result = trainpipe.run(QUICKSTART, overrides=_sft_only(tmp_path), observer=Notes())

    assert result.state == "succeeded", result.errors
    (attempt,) = Ledger(db_url).attempts(result.run_id, "sft")
    assert attempt["worker"] == "spawn"
    assert any("fresh interpreters" in n and "refused by TRAINPIPE_FAULT" in n for n in notes), notes


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def test_sigkilled_orchestrator_takes_the_worker_and_the_stage_down(tmp_path: Path, db_url: str) -> None:
    fired = tmp_path / "fired"
    fault = {"stage": "sft", "step": 2, "action": "pause", "seconds": 120, "once_file": str(fired)}
    orchestrator = start_run(QUICKSTART, fast_overrides(tmp_path / "out"), fault)
    try:
        wait_for(fired.exists, what="SFT to be mid-training")
        run_id = only_run_id(db_url)
        (attempt,) = Ledger(db_url).attempts(run_id, "sft")
        stage_pid = attempt["pid"]
        worker_pid = _parent_pid(stage_pid)
        assert attempt["worker"] == "fork"
        assert _parent_pid(worker_pid) == orchestrator.pid, "the stage's parent is the run's pre-imported worker"
        assert os.getpgid(stage_pid) == stage_pid, "the stage leads its own process group"
    finally:
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(timeout=30)

    wait_for(lambda: not pid_alive(worker_pid) and not pid_alive(stage_pid), timeout=30,
             what="the worker and the stage to die with the orchestrator")


# The worker's imports as on a GPU machine: torch believes one GPU is there and records who asks it to
# initialise CUDA. The throwaway interpreter that answers the capability query is told to say (9, 0).
_PRELOAD_AS_ON_A_GPU = """
import contextlib, json, sys, traceback
import torch

callers = []
def lazy_init():
    callers.append("".join(traceback.format_stack(limit=8)))
    raise RuntimeError("CUDA initialised")
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda._lazy_init = lazy_init
torch._C._cuda_getCurrentRawStream = lambda index: 0  # bitsandbytes' CUDA ops take it at import
real = torch.cuda.get_device_capability

from trainpipe.attempt import zygote
zygote.CAPABILITY_QUERY = "print('[[9, 0]]')"
if sys.argv[1] == "without-the-answer":
    zygote._capability_answered_elsewhere = lambda torch: contextlib.nullcontext()
zygote.preload()
import bitsandbytes.cextension
print(json.dumps({"callers": callers, "restored": torch.cuda.get_device_capability is real,
                  "nvml_check": zygote.os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
                  "backend": bitsandbytes.cextension.BNB_BACKEND}))
"""


def _preload_as_on_a_gpu(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    done = subprocess.run([sys.executable, "-c", _PRELOAD_AS_ON_A_GPU, mode], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_imports_never_initialise_cuda_on_a_gpu_machine() -> None:
    """bitsandbytes asks every GPU's compute capability at import; answered here, the worker can fork."""
    unanswered = _preload_as_on_a_gpu("without-the-answer")
    assert len(unanswered["callers"]) == 1 and "bitsandbytes" in unanswered["callers"][0], unanswered

    answered = _preload_as_on_a_gpu("answered")

    assert answered["callers"] == [], "nothing else in the preload initialises CUDA"
    assert answered["backend"] == "CUDA", "bitsandbytes still saw a GPU"
    assert answered["restored"], "the stage child gets torch's own get_device_capability"
    assert answered["nvml_check"] == "1", "is_available() must not initialise the driver either"


_FAKE_DRIVER = """
static int initialised = 0;
int cuInit(unsigned int flags) { initialised = 1; return 0; }
int cuDeviceGetCount(int *count) { if (!initialised) return 3; *count = 1; return 0; }
"""

_PROBE_THE_DRIVER = """
import ctypes, json, sys
from trainpipe.attempt import zygote
seen = {"not_loaded": zygote.cuda_driver_initialised()}
driver = ctypes.CDLL(sys.argv[1])
seen["loaded"] = zygote.cuda_driver_initialised()
driver.cuInit(0)
seen["after_cuInit"] = zygote.cuda_driver_initialised()
seen["reason"] = zygote.fork_unsafe_reason()
print(json.dumps(seen))
"""


def test_worker_refuses_to_fork_once_the_cuda_driver_is_initialised(tmp_path: Path) -> None:
    """cudaGetDeviceCount (a plain is_available()) calls cuInit without torch knowing; the worker asks
    the driver. A stand-in libcuda.so.1 with the driver's contract: NOT_INITIALIZED (3) before cuInit."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in libcuda.so.1")
    (tmp_path / "driver.c").write_text(_FAKE_DRIVER)
    library = tmp_path / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(library),
                    str(tmp_path / "driver.c")], check=True)

    done = subprocess.run([sys.executable, "-c", _PROBE_THE_DRIVER, str(library)], capture_output=True,
                          text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["not_loaded"] is False and seen["loaded"] is False
    assert seen["after_cuInit"] is True
    assert "CUDA driver is initialised" in seen["reason"]
