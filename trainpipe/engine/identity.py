"""What identifies a run's inputs and where it runs, read without torch: the base model's content (the
built-in model's checksums, a local folder's file hashes, or a Hub id at the revision the local cache
holds), a dataset's (stages/sources.py: its files' sha256, or Hub id, split and commit), and the
environment's device and world size. Fingerprints (fingerprint.py) and lineage (lineage.py) both use
it; neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainpipe.checkpoints import sha256_file, sha256_files
from trainpipe.stages.sources import identity as dataset_identity

__all__ = ["base_model_identity", "cuda_device_visible", "dataset_identity", "digest", "gpu_name", "nproc_per_node",
           "world_size"]


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def cuda_device_visible() -> bool:
    """A visible NVIDIA device node, standing in for `torch.cuda.is_available()` in the orchestrator,
    which never imports torch."""
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def base_model_identity(name: str) -> dict[str, Any]:
    """What identifies the base model's content: the built-in model's SHA256SUMS (its recipe and every
    file's hash), a local directory's file hashes, or a Hub id with the revision the local cache holds."""
    from trainpipe.stages.tiny_model import ASSET_DIR, CHECKSUMS, is_builtin

    if is_builtin(name):
        return {"builtin": name, "sha256sums": sha256_file(ASSET_DIR / CHECKSUMS)}
    local = Path(name).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
        return {"local": digest(list(zip([str(p.relative_to(local)) for p in files], _unchanged_file_hashes(files))))}
    return {"hub": name, "revision": _hub_revision(name)}


# (resolved path, size, mtime_ns) -> sha256. A run asks for the base model's identity more than once
# (its lineage at creation, its stages' fingerprints, a resume's environment check); a 0.5B model is
# ~1 GB to read each time. A file rewritten in place changes its mtime, so a stale hash is not reused.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _unchanged_file_hashes(paths: list[Path]) -> list[str]:
    keys = []
    for path in paths:
        stat = path.stat()
        keys.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    todo = [(key, path) for key, path in zip(keys, paths) if key not in _FILE_HASHES]
    _FILE_HASHES.update(zip([key for key, _ in todo], sha256_files([path for _, path in todo])))
    return [_FILE_HASHES[key] for key in keys]


def _hub_revision(repo_id: str) -> str | None:
    """The commit `main` points at in the local Hub cache (what from_pretrained loads offline), or None
    when it is not cached yet: then the id alone is hashed, and a later download of a newer `main`
    goes unnoticed until the cache records it."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    ref = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def world_size(stage_settings: Mapping[str, Any] | None) -> int:
    """Processes a stage trains with: the torchrun launcher's nproc_per_node x nnodes, else 1. Read
    from the settings dict defensively: a config without the `launcher` key (or with it null) is
    single-process."""
    launcher = (stage_settings or {}).get("launcher")
    if not isinstance(launcher, Mapping):
        return 1
    return nproc_per_node(launcher) * int(launcher.get("nnodes") or 1)


def nproc_per_node(launcher: Mapping[str, Any]) -> int:
    """The launcher's ranks on this node, `auto` resolved here and nowhere else (the lineage, the
    fingerprint and the torchrun command agree): the GPUs the driver lists when CUDA is visible, else
    the CPUs this process may run on (its affinity, which taskset and cgroups narrow)."""
    value = launcher.get("nproc_per_node") or 1
    if value != "auto":
        return int(value)
    if cuda_device_visible():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = len(list(Path("/proc/driver/nvidia/gpus").glob("*")))
        return max(1, len([d for d in visible.split(",") if d.strip()]) if visible else gpus)
    from trainpipe.cpus import usable_cores

    return usable_cores()


def gpu_name() -> str | None:
    """The first GPU's name from the driver, without torch: /proc first, nvidia-smi as a fallback."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None
