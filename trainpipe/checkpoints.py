"""Checkpoint manifests. A checkpoint counts only once its manifest, written last, lists a sha256
for every file and those hashes still match; a half-written or corrupted one is skipped on resume.
Torch-free, so the orchestrator can verify checkpoints without loading them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "trainpipe_manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path], threads: int | None = None) -> list[str]:
    """sha256 of each path, in order, on several threads (hashlib and file reads release the GIL). A
    merged model's shards are most of what a stage writes, and one core hashes ~1.5 GB/s: a 70B
    model's 140 GB would take minutes on one thread (benchmarks/hashing.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from trainpipe.cpus import usable_cores

    threads = threads or min(8, usable_cores())
    if threads <= 1 or len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def tree_files(root: Path) -> list[Path]:
    """Every file under root that a hash of the tree covers (all but a checkpoint's manifest), sorted."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]


def hash_tree(root: Path, threads: int | None = None) -> list[tuple[str, int, str]]:
    """(path relative to root, size, sha256) for every file, sorted."""
    paths = tree_files(root)
    return [(str(p.relative_to(root)), p.stat().st_size, digest)
            for p, digest in zip(paths, sha256_files(paths, threads))]


def rng_files(world_size: int) -> list[str]:
    """The RNG state files the HF Trainer writes per checkpoint: one per rank under DDP. A missing
    one is not an error to the Trainer (it logs and goes on with a fresh RNG), so resume would no
    longer be bit-identical without anyone noticing; `verify` refuses such a checkpoint instead."""
    return [f"rng_state_{r}.pth" for r in range(world_size)] if world_size > 1 else ["rng_state.pth"]


def write_manifest(checkpoint_dir: Path, step: int, world_size: int = 1) -> str:
    files = {rel: {"size": size, "sha256": digest} for rel, size, digest in hash_tree(checkpoint_dir)}
    manifest = {"step": step, "files": files}
    if world_size > 1:  # single-process manifests keep their old shape, and their old hashes
        manifest["world_size"] = world_size
    body = json.dumps(manifest, sort_keys=True, indent=1)
    tmp = checkpoint_dir / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint_dir / MANIFEST)
    return hashlib.sha256(body.encode()).hexdigest()


def manifest_step(checkpoint_dir: str | Path) -> int | None:
    try:
        step = json.loads((Path(checkpoint_dir) / MANIFEST).read_text(encoding="utf-8")).get("step")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def verify(checkpoint_dir: str | Path, world_size: int | None = None) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it cannot be trusted. With
    `world_size`, a checkpoint saved by another number of ranks is refused too: its per-rank RNG
    states and data shards do not map onto this attempt's ranks (a resume forced past a world-size
    change then restarts the stage instead of continuing it inexactly)."""
    root = Path(checkpoint_dir)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        return "directory is missing"
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "manifest is unreadable"
    saved_by = manifest.get("world_size", 1)
    if world_size is not None and saved_by != world_size:
        return f"saved by {saved_by} rank(s), and this attempt runs {world_size}"
    if saved_by > 1:
        missing = [name for name in rng_files(saved_by) if name not in manifest.get("files", {})]
        if missing:
            return f"{', '.join(missing)} not saved (a rank's RNG state is missing)"
    for rel, meta in manifest.get("files", {}).items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None
