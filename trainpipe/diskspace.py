"""Disk space: what a filesystem has left, whether it refuses writes now, and the one message a full
disk gets (ENOSPC, EDQUOT, EROFS), wherever the write was: a stage, a gate or the orchestrator."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# Errors that mean "the filesystem will not take this write", whatever the write was.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}
# A write that failed with this much or less left on its filesystem failed for want of space.
NEARLY_FULL_BYTES = 1024 * 1024


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """The directory itself, or the nearest parent that exists (what a `mkdir -p` would write into)."""
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current if current.is_dir() else current.parent


def free_bytes(path: str | os.PathLike[str]) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def write_refusal(directory: str | os.PathLike[str], needed_bytes: int = 0) -> tuple[int, str] | None:
    """(errno, reason) when `directory`'s filesystem refuses writes now: read-only, or (nearly) full,
    that is with less free than `needed_bytes` (what the failed step was estimated to write) or 1 MB.

    A probe write finds the real errno (ENOSPC, EDQUOT, EROFS) where the error that reached us lost
    it: torch's writer reports a short write as `basic_ios::clear: iostream error` or
    `PytorchStreamWriter failed writing file`, and safetensors as its own error type."""
    where = existing_ancestor(directory)
    try:
        stats = os.statvfs(where)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS, DISK_ERRNOS[errno.EROFS]
    probe = where / f".trainpipe-space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            return exc.errno, DISK_ERRNOS[exc.errno]
        return None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if stats.f_bavail * stats.f_frsize <= max(NEARLY_FULL_BYTES, needed_bytes):
        return errno.ENOSPC, DISK_ERRNOS[errno.ENOSPC]
    return None


def full_disk_message(directory: str | os.PathLike[str], reason: str, *, needed: str | None = None,
                      run_id: str | None = None) -> str:
    """The one message every full-disk error gets: where, how much is free, roughly what was needed
    and, given the run, what to do (otherwise the run summary says it). Free space and size are
    measured now, not at the moment of the failed write."""
    where = existing_ancestor(directory)
    try:
        usage = shutil.disk_usage(where)
        space = f"{human(usage.free)} free of {human(usage.total)}"
    except OSError:
        space = "free space unknown"
    text = f"{reason}: {where} ({space})"
    if needed:
        text += f"; {needed}"
    if run_id:
        text += f"; free space there (or move output_dir to a larger disk), then `trainpipe resume {run_id}`"
    return text
