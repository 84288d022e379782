"""Test-only fault injection (the TRAINPIPE_FAULT environment variable), all of it in this one module.

Real OOMs, crashes and kills at an exact moment cannot be provoked on demand, so the fault-matrix
tests name one in TRAINPIPE_FAULT and production code calls the hook at that point; without the
variable every hook returns at once. Torch-free at import, so the orchestrator can use it too.

In a stage's process: {"stage": "sft", "step": 6 | "at": "start"|"gate", "action":
"oom|sigkill|crash|pause|tamper_output", "seconds": 30, "rank": 0, "once_file": PATH}.
In the orchestrator: {"action": "kill_orchestrator"|"crash_orchestrator", "at": "sft:validate", "step": N}.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any


def fire_once(fault: dict[str, Any]) -> bool:
    """With a `once_file`, a fault fires only while that file does not exist, and creating it is
    part of firing, so the retry or resume that follows runs clean. Without one it always fires."""
    once = fault.get("once_file")
    if not once:
        return True
    if Path(once).exists():
        return False
    Path(once).write_text("fired\n")
    return True


def stage_fault(stage: str) -> dict[str, Any]:
    """The fault TRAINPIPE_FAULT names for this stage's process, or {}."""
    raw = os.environ.get("TRAINPIPE_FAULT")
    if not raw:
        return {}
    fault = json.loads(raw)
    return fault if fault.get("stage") == stage else {}


def inject(fault: dict[str, Any]) -> None:
    """Fire the fault's action here, in this process (once, with `once_file`)."""
    if not fire_once(fault):
        return
    action = fault.get("action")
    if action == "pause":
        import time

        time.sleep(float(fault.get("seconds", 30)))
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError("injected CUDA out of memory (TRAINPIPE_FAULT)")
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "crash":
        raise RuntimeError("injected crash (TRAINPIPE_FAULT)")


def at_step(fault: dict[str, Any], step: int, rank: int) -> None:
    """A training-step hook: under torchrun a step fault fires on one rank ("rank", default 0)."""
    if fault.get("step") == step and fault.get("rank", 0) == rank:
        inject(fault)


def at_point(fault: dict[str, Any], point: str) -> None:
    """A stage-process hook at a named point: "start", before the stage; "gate", before its gate;
    "rename", in finalize_output after the previous output was removed and before the staging dir
    is renamed into its place."""
    if fault.get("at") == point:
        inject(fault)


def tamper_output(fault: dict[str, Any], output_path: str) -> None:
    """Action "tamper_output": change one weight of the finished output before its gate runs, as a
    bad disk or a stray script would."""
    if fault.get("action") != "tamper_output":
        return
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(output_path) / fault.get("file", "model.safetensors")
    tensors = load_file(str(path))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)[0]
    tensors[name] = tensors[name] + float(fault.get("delta", 0.05)) * torch.ones_like(tensors[name])
    save_file(tensors, str(path), metadata={"format": "pt"})


def orchestrator_point(point: str, step: int | None = None) -> None:
    """An orchestrator hook right after the named ledger write: SIGKILL this process there, to prove a
    resume recovers from that moment ("crash_orchestrator" raises instead: an orchestrator bug, for
    the CLI's last-resort handler). Points: run:start, <stage>:start|validate|pass_gate|cached,
    <stage>:checkpoint (with "step"), and <stage>:checkpoint_written (with "step": the stage wrote
    it, the ledger has not recorded it yet)."""
    raw = os.environ.get("TRAINPIPE_FAULT")
    if not raw or '_orchestrator"' not in raw:
        return
    fault = json.loads(raw)
    if fault.get("at") != point or (step is not None and fault.get("step") != step):
        return
    if fire_once(fault):
        if fault.get("action") == "crash_orchestrator":
            raise RuntimeError(f"injected orchestrator crash at {point} (TRAINPIPE_FAULT)")
        os.kill(os.getpid(), signal.SIGKILL)
