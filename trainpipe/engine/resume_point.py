"""Which checkpoint a stage attempt resumes from: the newest one whose manifest verifies, after adopting
complete checkpoints the ledger never recorded, and discarding the unverified ones past it."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainpipe import checkpoints
from trainpipe.store.ledger import Ledger


def newest_verified_checkpoint(ledger: Ledger, run_id: str, stage: str,
                               world_size: int | None = None) -> tuple[str | None, list[str]]:
    """The newest checkpoint whose manifest verifies (for `world_size` ranks, when given), and why
    any newer ones were passed over."""
    skipped: list[str] = []
    for row in sorted(ledger.checkpoints(run_id, stage), key=lambda r: (r["step"], r["id"]), reverse=True):
        problem = checkpoints.verify(row["path"], world_size)
        if problem is None:
            return row["path"], skipped
        skipped.append(f"{row['path']}: {problem}")
    return None, skipped


def adopt_unrecorded_checkpoints(ledger: Ledger, run_id: str, stage: str, checkpoint_root: Path) -> list[str]:
    """Record finished checkpoints the ledger never heard of.

    The stage writes the manifest, then tells the orchestrator; an orchestrator killed in between
    would otherwise throw away a complete checkpoint. The manifest's hashes make it safe to adopt.
    """
    known = {row["path"] for row in ledger.checkpoints(run_id, stage)}
    attempts = ledger.attempts(run_id, stage)
    if not attempts or not checkpoint_root.is_dir():
        return []
    adopted = []
    for path in sorted(checkpoint_root.glob("checkpoint-*"), key=lambda p: checkpoint_step(p) or -1):
        step = checkpoint_step(path)
        complete = step is not None and checkpoints.verify(path) is None and checkpoints.manifest_step(path) == step
        if str(path) in known or not complete:
            continue
        ledger.record_checkpoint(run_id, stage, attempts[-1]["id"], step, str(path),
                                 checkpoints.sha256_file(path / checkpoints.MANIFEST))
        adopted.append(str(path))
    return adopted


def checkpoint_step(path: str | Path) -> int | None:
    suffix = Path(path).name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def discard_newer_checkpoints(checkpoint_root: Path, keep: str | None) -> None:
    """Unrecorded or unverified checkpoints past the resume point would be overwritten anyway."""
    keep_step = checkpoint_step(keep) if keep else -1
    for path in checkpoint_root.glob("checkpoint-*"):
        step = checkpoint_step(path)
        if step is not None and step > keep_step:
            shutil.rmtree(path, ignore_errors=True)


def choose_resume_point(ledger: Ledger, run_id: str, stage: str, checkpoint_root: Path,
                        world_size: int | None) -> tuple[str | None, list[str], list[str]]:
    """(checkpoint to resume from or None, newer ones passed over and why, ones adopted just now)."""
    adopted = adopt_unrecorded_checkpoints(ledger, run_id, stage, checkpoint_root)
    resume_from, skipped = newest_verified_checkpoint(ledger, run_id, stage, world_size)
    discard_newer_checkpoints(checkpoint_root, resume_from)
    return resume_from, skipped, adopted
