"""What kind of failure an exception is, in one table: the stage worker records it, the run driver
decides on it (retry or not, exit code) and `inspect` shows it. Torch-free: exceptions are matched
by class name and message, so classifying never imports the library that raised.

- `user`: the input is wrong (a missing or unloadable model, a bad file, a permission, a config
  that does not fit the model). A retry would fail the same way: not retried, exit 2.
- `transient`: the machine had a bad moment (OOM, a kill, a timeout, an I/O hiccup). Retried.
- `environment`: the machine will not take the write: no space left, a disk quota, a read-only
  mount (ENOSPC, EDQUOT, EROFS, wherever they surface). Nothing is wrong with the input or the code
  and nothing is lost: the run stops `interrupted`, to be resumed once space is freed. Not retried
  (the disk stays full until someone frees it), exit 75 (EX_TEMPFAIL), no traceback.
- `bug`: anything else. Not retried (the same code fails the same way), exit 1, traceback kept.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainpipe.errors import TrainpipeError

USER, TRANSIENT, ENVIRONMENT, BUG = "user", "transient", "environment", "bug"

# How a stage process ended when there is no exception to look at (see engine/supervisor.py).
CAUSE_KIND = {"oom": TRANSIENT, "killed": TRANSIENT, "timed_out": TRANSIENT, "io": TRANSIENT,
              # a DDP rank whose peer rank died: the cause is the peer's (engine/supervisor.py)
              "peer_lost": TRANSIENT,
              "disk": ENVIRONMENT,
              "user": USER, "bug": BUG, "no_result": BUG,
              "error": BUG}  # "error": result files written before kinds existed

# Class names anywhere in the exception's MRO.
_TYPES = [
    ("oom", {"OutOfMemoryError", "MemoryError"}),
    ("user", {"TrainpipeError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError",
              "PermissionError", "ModuleNotFoundError",  # a missing optional package
              # huggingface_hub: a model that is not there, not allowed, or not fetchable
              "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError",
              "LocalEntryNotFoundError", "OfflineModeIsEnabled",
              # a file that is not what it claims to be
              "SafetensorError", "JSONDecodeError", "UnicodeDecodeError", "YAMLError"}),
    ("io", {"TimeoutError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
            "ReadTimeout", "ConnectTimeout"}),
]
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_ERRNOS = [
    ("user", {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}),
    ("io", {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET,
            errno.ECONNABORTED, errno.EPIPE, errno.EINTR}),
]
# The same, as libraries word it without an errno: safetensors' SafetensorError (Rust's StorageFull),
# SQLite's "database or disk is full", huggingface_hub's wrapped OSErrors. Looked at before the class
# names, since a SafetensorError is otherwise a file that is not what it claims to be.
_DISK_MESSAGE = re.compile(r"no space left on device|disk quota exceeded|read-only file system|storagefull"
                           r"|database or disk is full")
# A write that failed and lost its errno on the way: torch's serializer (caffe2's PytorchStreamWriter)
# reports a short write as an iostream error. Whether the disk was the reason is asked of the disk.
_LOST_ERRNO_WRITE = re.compile(r"basic_ios::clear|pytorchstreamwriter failed|file write failed|unexpected pos \d+")
# Messages libraries raise as plain OSError/ValueError/RuntimeError.
_MESSAGES = [
    ("oom", r"out of memory"),
    # gloo/NCCL when another rank of a torchrun stage is gone: ours is a symptom, not the cause
    ("peer_lost", r"gloo/transport/|remote worker|nccl communicator was aborted|connection closed by peer"),
    # transformers, model not in the cache and not downloadable; a retry will not make it appear
    ("user", r"we couldn't connect to|is not a local folder and is not a valid model"
             r"|does not appear to have (a file|files) named|can't load (the )?(tokenizer|config)"
             r"|incorrect path_or_model_id|repository not found"),
    # a config that does not fit the model or the checkpoint
    ("user", r"size mismatch for|target modules? .* not found|error\(s\) in loading state_dict"
             r"|error while deserializing header|no such file or directory|permission denied"),
    ("user", r"requires .* pip install|pip install [\w-]+"),  # transformers' ImportError for bitsandbytes etc.
    ("io", r"input/output error|connection reset|temporarily unavailable"),
]


@dataclass(frozen=True)
class Failure:
    kind: str    # user, transient, environment, bug
    cause: str   # oom, io, disk, user, bug: finer, for the retry policy (OOM halves the batch)
    where: str | None = None  # disk: the directory whose filesystem refused the write, when known
    reason: str | None = None  # disk: no space left on device, disk quota exceeded, read-only file system


def _disk_cause(exc: BaseException, written_dirs: Sequence[str | os.PathLike[str]],
                needed_bytes: int) -> Failure | None:
    """A `disk` failure when `exc` is a write the filesystem refused."""
    code = getattr(exc, "errno", None)
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    text = str(exc).lower()
    if not ((isinstance(exc, OSError) and code in _DISK_ERRNOS) or _DISK_MESSAGE.search(text)
            or _LOST_ERRNO_WRITE.search(text)):
        return None
    from trainpipe.diskspace import DISK_ERRNOS, write_refusal

    reason = DISK_ERRNOS.get(code) if isinstance(exc, OSError) else None
    if reason is None:
        reason = next((r for r in DISK_ERRNOS.values() if r in text), "no space left on device")
    if filename:
        where = Path(os.fsdecode(filename))
        return Failure(ENVIRONMENT, "disk", str(where if where.is_dir() else where.parent), reason)
    for directory in written_dirs:
        refusal = write_refusal(directory, needed_bytes)
        if refusal is not None:
            return Failure(ENVIRONMENT, "disk", str(directory), refusal[1])
    if _LOST_ERRNO_WRITE.search(text):
        return None  # a failed write on a disk with room: not ours to explain
    return Failure(ENVIRONMENT, "disk", None, reason)


def _classify_one(exc: BaseException) -> str | None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    for cause, types in _TYPES:
        if names & types:
            return cause
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code is not None:
        for cause, codes in _ERRNOS:
            if code in codes:
                return cause
    text = str(exc).lower()
    for cause, pattern in _MESSAGES:
        if re.search(pattern, text):
            return cause
    return None


def classify(exc: BaseException, written_dirs: Sequence[str | os.PathLike[str]] = (),
             needed_bytes: int = 0) -> Failure:
    """The exception, then what it was explicitly raised from (`raise X from Y`; transformers wraps
    hub errors this way). `__context__` is not followed: a bug inside an `except` block is a bug.

    `written_dirs` are the directories the failed code was writing into: a write error that lost its
    errno is a full disk when one of their filesystems refuses a probe write now, or has less free
    than `needed_bytes` (diskspace.py)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        disk = _disk_cause(seen, written_dirs, needed_bytes)
        if disk is not None:
            return disk
        cause = _classify_one(seen)
        if cause is not None:
            return Failure(CAUSE_KIND[cause], cause)
        seen = seen.__cause__
    return Failure(BUG, "bug")


def kind_of(cause: str | None) -> str | None:
    return CAUSE_KIND.get(cause or "", BUG) if cause else None


def retryable(kind: str | None) -> bool:
    return kind == TRANSIENT


def describe(exc: BaseException) -> str:
    """One line for the ledger and the terminal: our own errors by their message, others by type."""
    if isinstance(exc, TrainpipeError):
        return f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return f"{type(exc).__name__}: {exc}"
