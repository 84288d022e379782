"""The stage cache: reuse a stage output that an earlier run produced from the same fingerprint.

A candidate is a stage of another run with the same fingerprint that `passed` (or was itself reused).
It is reused only if every file the ledger recorded for it still exists with the recorded size and
sha256; otherwise the next candidate is tried, and if none verifies the stage trains, with the
reasons recorded.

Reused files are hard-linked into the new run's own directory (copied where a hard link is not
possible, e.g. across filesystems), not referenced at the origin's path. So every run directory stays
complete on its own and keeps the lesson's layout: deleting the origin run's directory later does not
break this run, downstream stages read their input from this run as usual, and the run's final model
lies under its own run dir. A hard link costs no space, and nothing trainpipe writes modifies a file
in place (outputs are renamed into place, exports are written atomically), so the two names never
diverge by our doing; a file altered in place by someone else changes under both names, which the
sha256 check on the next reuse catches.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from trainpipe.checkpoints import sha256_file

if TYPE_CHECKING:
    from trainpipe.store.ledger import Ledger
    from trainpipe.store.reader import LedgerReader


class Hit(NamedTuple):
    candidate: dict[str, Any]              # the source stage row, with its run's run_dir
    files: list[tuple[str, int, str]]      # (path relative to the source output dir, size, sha256)


def find(ledger: Ledger, run_id: str, stage: str, fingerprint: str) -> tuple[Hit | None, list[str]]:
    """The newest earlier output with this fingerprint whose files verify, and why newer ones did not."""
    problems: list[str] = []
    for candidate in ledger.cache_candidates(stage, fingerprint, exclude_run=run_id):
        files, problem = verify(ledger, candidate)
        if problem is None:
            return Hit(candidate, files), problems
        problems.append(f"run {candidate['run_id']}'s {stage} output {problem}")
    return None, problems


def verify(ledger: Ledger, candidate: dict[str, Any]) -> tuple[list[tuple[str, int, str]], str | None]:
    """The candidate's recorded files, and None if all still match the ledger, else what is wrong."""
    root = Path(candidate["output_path"] or "")
    latest: dict[str, dict[str, Any]] = {}
    for row in ledger.artifacts(candidate["run_id"]):
        if row["stage"] == candidate["name"]:
            latest[row["path"]] = row  # a stage re-run after a kill recorded its files again: last wins
    if not latest:
        return [], "has no recorded artifacts"
    files = []
    for path_text, row in sorted(latest.items()):
        path = Path(path_text)
        try:
            rel = path.relative_to(root)
        except ValueError:
            return [], f"lists {path}, outside its output dir {root}"
        if not path.is_file():
            return [], f"lost {rel} (file missing)"
        if path.stat().st_size != row["size_bytes"] or sha256_file(path) != row["sha256"]:
            return [], f"changed: {rel} no longer matches its sha256 in the ledger"
        files.append((str(rel), row["size_bytes"], row["sha256"]))
    return files, None


def link_into(source_root: Path, files: list[tuple[str, int, str]], dest: Path) -> str:
    """Hard-link (else copy) the files into `dest`, through a staging dir renamed into place like any
    stage output. Returns "hardlink" or "copy"."""
    staging = dest.parent / f".{dest.name}.cache-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    how = "hardlink"
    for rel, _size, _digest in files:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source_root / rel, target)
        except OSError:
            shutil.copy2(source_root / rel, target)
            how = "copy"
    staging.mkdir(parents=True, exist_ok=True)
    # A leftover from an earlier attempt at this stage (an orchestrator killed before it recorded the
    # reuse, or a started stage's partial output) is never taken for the reused one.
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    return how


def rebase(value: Any, old_root: str, new_root: str) -> Any:
    """Metrics of the run that trained a stage name paths in that run's dir; point them at this run's."""
    if isinstance(value, str) and old_root and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
        return new_root + value[len(old_root):]
    if isinstance(value, dict):
        return {k: rebase(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase(v, old_root, new_root) for v in value]
    return value


def origin_metrics(ledger: LedgerReader, run_id: str, stage: str, run_dir: str) -> tuple[dict[str, Any], str]:
    """The metrics of the attempt that trained this run's `stage` (itself, or the origin of a cached
    stage, following reuse of reuse), with paths rebased to `run_dir`, and the id of the training run."""
    origin = ledger.trained_origin(run_id, stage)
    if origin is None:  # not cached: trained in this run
        attempts = ledger.attempts(run_id, stage)
        origin = {"run_id": run_id, "run_dir": ledger.get_run(run_id)["run_dir"],
                  "attempt": attempts[-1] if attempts else None}
    attempt = origin["attempt"] or {}
    return rebase(attempt.get("metrics") or {}, origin["run_dir"], run_dir), origin["run_id"]
