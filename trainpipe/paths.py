"""Where trainpipe keeps things, and the checks that keep user-supplied names inside them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from trainpipe.errors import TrainpipeError

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def home_dir() -> Path:
    return Path(os.environ.get("TRAINPIPE_HOME") or Path.home() / ".trainpipe")


def cache_dir() -> Path:
    return Path(os.environ.get("TRAINPIPE_CACHE") or home_dir() / "cache")


def bundled_path(relative: str) -> Path:
    """A file shipped with trainpipe: the source checkout's copy, else the wheel's `_bundled/` copy."""
    for root in (_REPO_ROOT, Path(__file__).resolve().parent / "_bundled"):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise TrainpipeError(f"bundled file '{relative}' is missing from this installation")


def check_run_id(run_id: str) -> str:
    """Run ids name directories; refuse anything that could step outside the output dir."""
    if not _RUN_ID.match(run_id) or ".." in run_id:
        raise TrainpipeError(f"invalid run id '{run_id}': use letters, digits, '.', '_' and '-' only")
    return run_id


def inside(base: str | os.PathLike[str], *parts: str) -> Path:
    """Join under `base`, refusing a result that escapes it (via '..', an absolute part or a symlink)."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise TrainpipeError(f"path '{Path(*parts)}' escapes the output dir {root}")
    return path


def dir_problem(path: str | os.PathLike[str], *, create: bool = False) -> str | None:
    """Why a directory cannot be used at `path` (made if missing, then written in), or None.

    With `create=False` nothing is left behind: the probe is an empty directory made and removed in
    the nearest existing ancestor, which is exactly what `mkdir -p` and the first write would need.
    `os.access` is not enough: root passes it on /proc, and it says nothing about a full disk.
    """
    import tempfile

    target = Path(path)
    existing = target
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:
        return f"cannot look into {existing} ({exc.strerror})"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if create:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create {target} ({exc.strerror})"
        existing = target
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trainpipe-probe-", dir=existing))
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror})"
    return None
