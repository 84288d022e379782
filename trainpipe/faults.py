"""Test-only fault injection (TRAINPIPE_FAULT). Torch-free, so the orchestrator can use it too."""

from __future__ import annotations

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


def stage_point(fault: dict[str, Any], point: str) -> None:
    """A kill point inside the stage process: fire this stage's fault (stages/training.inject_fault)
    when its "at" names `point`. "rename": in finalize_output, after the previous output was removed
    and before the staging dir is renamed into its place."""
    if fault and fault.get("at") == point:
        from trainpipe.stages.training import inject_fault

        inject_fault(fault)
