"""What only a CUDA machine can show; skipped without one (CI has none). On a GPU box with a CUDA
build of torch: `pytest -q -m gpu tests/test_gpu.py`. No session has run these yet: none was lent a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, fast_overrides


def _cuda_machine() -> bool:
    # No torch here: importing it at collection would slow every test run for nothing.
    return os.path.exists("/dev/nvidiactl") and shutil.which("nvidia-smi") is not None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda_machine(), reason="needs an NVIDIA GPU")]

# The worker's own preload, then a fork whose child does CUDA work: what every stage attempt does.
_PRELOAD_THEN_FORK = """
import os, sys
import torch
if torch.version.cuda is None:
    sys.exit(77)
from trainpipe.attempt import zygote
zygote.preload()
assert not torch.cuda.is_initialized(), "torch initialised CUDA during the preload"
assert not zygote.cuda_driver_initialised(), "something called cuInit during the preload"
assert zygote.fork_unsafe_reason() is None
pid = os.fork()
if pid == 0:
    x = torch.randn(256, 256, device="cuda")
    os._exit(0 if torch.isfinite(x @ x).all().item() else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_forked_child_of_the_preloaded_worker_uses_cuda() -> None:
    done = subprocess.run([sys.executable, "-c", _PRELOAD_THEN_FORK], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "TRAINPIPE_FAULT"})
    if done.returncode == 77:
        pytest.skip("torch is a CPU build")
    assert done.returncode == 0, done.stderr[-4000:]


def test_stage_attempts_on_cuda_are_forked(tmp_path: Path, db_url: str, monkeypatch) -> None:
    import torch

    import trainpipe
    from trainpipe.store.ledger import Ledger

    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build")
    monkeypatch.delenv("TRAINPIPE_WORKER", raising=False)

    result = trainpipe.run(QUICKSTART, overrides=fast_overrides(tmp_path / "out") + ["stages.dpo.enabled=false"])

    assert result.state == "succeeded", result.errors
    attempts = Ledger(db_url).attempts(result.run_id, "sft") + Ledger(db_url).attempts(result.run_id, "merge")
    assert [a["worker"] for a in attempts] == ["fork", "fork"], attempts
