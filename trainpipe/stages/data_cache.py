"""Tokenize once: TRL's prepared (tokenized, truncated, labelled) datasets, kept under
$TRAINPIPE_HOME/tokenized/<key>/ and reused by every retry, resume, run and sweep trial whose key is
the same. The key covers everything the tokens depend on: the source's content, how its rows are
read and split, the tokenizer's content and chat template, the max length, the loss mask setting,
and the trl/transformers/datasets versions.

TRL prepares inside the trainer's constructor; `cached_trainer` wraps the trainer class so that its
`_prepare_dataset` returns the cached dataset, or prepares and stores it. The tokens are TRL's own,
so a reused dataset trains exactly as a fresh one would. An entry is verified against its manifest
(sha256 of every file) before use; a damaged one is removed and rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.checkpoints import sha256_file
from trainpipe.paths import home_dir
from trainpipe.versions import package_versions
from trainpipe.stages import distributed

MANIFEST = "trainpipe_manifest.json"
VERSIONED = ("trl", "transformers", "datasets", "tokenizers")


def cache_root() -> Path:
    return home_dir() / "tokenized"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's content (vocabulary, merges, normalisation) and its chat template, wherever it
    was loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"sha256": hashlib.sha256(body.encode()).hexdigest(), "class": type(tokenizer).__name__,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}


@dataclass
class Entry:
    """One prepared dataset's place in the cache, and what happened to it in this attempt."""

    role: str
    key: str
    hit: Any = None                      # the cached dataset, when there was one
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return cache_root() / self.key

    def lookup(self, events: Any) -> Any:
        """The verified cached dataset, or None (a damaged entry is removed and its reason recorded)."""
        started = time.perf_counter()
        problem = _verify(self.path)
        if problem == "absent":
            return None
        if problem:
            self.record["rebuilt_because"] = problem
            events.emit("note", text=f"tokenized {self.role} data at {self.path} is damaged ({problem}); rebuilding")
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        from datasets import load_from_disk

        self.hit = load_from_disk(str(self.path / "data"))
        self.record.update(action="reused", seconds=round(time.perf_counter() - started, 3), rows=len(self.hit),
                           key=self.key)
        events.emit("data", role=self.role, phase="tokenize", **self.record)
        return self.hit

    def store(self, prepared: Any, seconds: float, events: Any) -> None:
        self.record.update(action="prepared", seconds=round(seconds, 3), rows=len(prepared), key=self.key)
        if distributed.is_main():
            _write(self.path, prepared)
        events.emit("data", role=self.role, phase="tokenize", **self.record)


def key_for(role: str, stage: str, source_identity: dict[str, Any] | None, split: dict[str, Any],
            tokenizer: Any, settings: dict[str, Any]) -> str:
    payload = {"role": role, "stage": stage, "source": source_identity, "split": split,
               "tokenizer": tokenizer_identity(tokenizer), "settings": settings,
               "versions": package_versions(VERSIONED)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}-{role}-{digest[:32]}"


def _verify(path: Path) -> str | None:
    """None when the entry is whole, "absent" when there is none, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not path.exists():
        return "absent"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "manifest missing or unreadable"
    for rel, expected in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != expected["size"] or sha256_file(file) != expected["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def _write(path: Path, prepared: Any) -> None:
    """Save to a temporary folder, write the manifest, then rename into place: a reader sees a whole
    entry or none. Of two writers of one key (parallel sweep trials), the first rename wins."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prepared.save_to_disk(str(tmp / "data"))
    files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files, "rows": len(prepared)}, indent=1), encoding="utf-8")
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another writer got there first with the same content


def cached_trainer(trainer_cls: type, entries: dict[str, Entry], events: Any) -> type:
    """`trainer_cls` whose dataset preparation goes through the cache, for the named datasets
    ("train", "eval"). TRL calls `_prepare_dataset(dataset, ..., dataset_name)` from its constructor
    (SFTTrainer and DPOTrainer alike, trl 1.15 and 1.16)."""

    class CachedPreparation(trainer_cls):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            name = kwargs.get("dataset_name", args[-1] if args else None)
            entry = entries.get(name)
            if entry is None:
                return super()._prepare_dataset(dataset, *args, **kwargs)
            if entry.hit is not None and dataset is entry.hit:
                return dataset
            events.emit("data", role=entry.role, phase="tokenize", action="started", rows=len(dataset))
            started = time.perf_counter()
            prepared = super()._prepare_dataset(dataset, *args, **kwargs)
            entry.store(prepared, time.perf_counter() - started, events)
            return prepared

    CachedPreparation.__name__ = trainer_cls.__name__
    return CachedPreparation
