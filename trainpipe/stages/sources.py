"""Where a dataset's rows come from: local JSONL read line by line (so an error names file:line and
memory stays flat), everything else through `datasets` (parquet, CSV, JSON arrays, Arrow,
`save_to_disk` folders, folders of data files, globs, Hub datasets), row by row from Arrow batches.

What identifies a source's content (for fingerprints, lineage and the tokenized-data cache) is
computed here without importing `datasets`: a local source's file hashes, a Hub source's id,
subset, split and resolved revision.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainpipe.checkpoints import sha256_file
from trainpipe.config import DatasetSource
from trainpipe.errors import DatasetError
from trainpipe.paths import home_dir

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROW_BATCH = 1000


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def is_save_to_disk(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def local_files(source: DatasetSource) -> list[Path]:
    """The data files of a local source, in a stable order. A `save_to_disk` folder lists its own files."""
    path = source.path or ""
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    elif Path(path).is_dir():
        folder = Path(path)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
        if not is_save_to_disk(folder):
            files = [p for p in files if p.suffix.lower() in BUILDERS]
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise DatasetError(f"{path}: dataset not found")
    if not files:
        what = "this folder has no data files" if Path(path).is_dir() else "no file matches"
        raise DatasetError(f"{path}: {what} (looked for {', '.join(sorted(BUILDERS))})")
    return files


def _json_lines(file: Path) -> bool:
    """JSONL, or a .json file holding one object per line (not a JSON array)."""
    if file.suffix.lower() == ".jsonl":
        return True
    if file.suffix.lower() != ".json":
        return False
    with file.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"{")


def read_line_by_line(source: DatasetSource) -> bool:
    """Whether the row checks read this source's text lines themselves (errors then name file:line)."""
    if source.hub:
        return False
    folder = Path(source.path or "")
    if folder.is_dir() and is_save_to_disk(folder):
        return False
    return all(_json_lines(f) for f in local_files(source))


# ---------------------------------------------------------------- streaming rows for the checks


def lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file. UTF-8, with or without a byte-order mark (editors on
    Windows add one); any other encoding is refused at the first line that does not decode."""
    with file.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise DatasetError(f"{file}:1: the file is UTF-16 (byte-order mark {raw[:2].hex(' ')}); "
                                       "save it as UTF-8")
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{file}:{line_no}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                   f"{exc.start + 1}); save the file as UTF-8") from None


def jsonl_rows(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, line in lines(file):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: each line must be a JSON object")
        yield where, row


def iter_rows(source: DatasetSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row, in order, holding one Arrow batch at most in memory."""
    if read_line_by_line(source):
        for file in local_files(source):
            if file.is_dir():
                raise DatasetError(f"{file}: dataset is a directory; point it at a data file")
            yield from jsonl_rows(file)
        return
    dataset = load(source)
    label = source.label()
    index = 0
    for batch in dataset.iter(batch_size=ROW_BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield f"{label} row {index}", dict(zip(keys, values))
            index += 1


# ---------------------------------------------------------------- loading through `datasets`


def local_cache_dir() -> str:
    """Arrow copies of local files live under TRAINPIPE_HOME, never in the user's Hugging Face cache."""
    return str(home_dir() / "hf-datasets")


def load(source: DatasetSource):
    """The source as an Arrow-backed `datasets.Dataset` (memory-mapped, not Python objects).

    Raises DatasetError naming the source and what exists when a split, subset or id is wrong."""
    import datasets

    datasets.disable_progress_bars()
    split = source.split or "train"
    try:
        if source.hub:
            return _load_hub(source, split)
        folder = Path(source.path or "")
        if folder.is_dir() and is_save_to_disk(folder):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DatasetError(f"{folder}: no split '{split}' in this save_to_disk folder; it has: "
                                       f"{', '.join(loaded)} (set `split:`)")
                return loaded[split]
            return loaded
        if folder.is_dir():
            return datasets.load_dataset(str(folder), split=split, cache_dir=local_cache_dir())
        if source.split not in (None, "train"):
            raise DatasetError(f"{source.path}: `split` applies to Hub datasets and folders of split files, "
                               "not to single files or globs")
        files = local_files(source)
        suffixes = {f.suffix.lower() for f in files}
        builders = {BUILDERS.get(s) for s in suffixes}
        if None in builders or len(builders) != 1:
            raise DatasetError(f"{source.path}: cannot read files of type {sorted(suffixes)} together; "
                               f"use one of {', '.join(sorted(BUILDERS))}")
        return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train",
                                     cache_dir=local_cache_dir())
    except DatasetError:
        raise
    except ValueError as exc:
        raise DatasetError(f"{source.label()}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a reader's error, said with the source it came from
        raise DatasetError(f"{source.label()}: cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_hub(source: DatasetSource, split: str):
    import datasets

    from trainpipe.credentials import hub_token

    snapshot = local_snapshot(source)
    if snapshot is None and offline():
        raise DatasetError(
            f"{source.label()}: not in the local Hugging Face cache, and the Hub cannot be asked (offline: "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set). Download it once where there is network with "
            f"`huggingface-cli download --repo-type dataset {source.hub}` (same HF_HOME), or unset the "
            "offline variables")
    where = str(snapshot) if snapshot is not None else source.hub
    try:
        builder = datasets.load_dataset_builder(where, name=source.subset, token=hub_token(),
                                                **({} if snapshot is not None else {"revision": source.revision}))
    except datasets.exceptions.DatasetNotFoundError:
        raise DatasetError(f"{source.label()}: not found on the Hub, or private (set HF_TOKEN for a private "
                           "dataset)") from None
    except ValueError as exc:
        text = _first_line(exc)
        if "BuilderConfig" in text or "Config name" in text:
            configs = datasets.get_dataset_config_names(where)
            raise DatasetError(f"{source.label()}: no subset '{source.subset}'; it has: {', '.join(configs)} "
                               "(set `subset:`)") from None
        raise
    # Packaged builders (parquet, json, ... repos) know their splits from their data files before
    # anything is prepared; script-less Hub repos with dataset_info know them from the info.
    splits = list((builder.info.splits or {}).keys()) or list(getattr(builder.config, "data_files", None) or {})
    if splits and split not in splits:
        raise DatasetError(f"{source.label()}: no split '{split}'; it has: {', '.join(splits)} (set `split:`)")
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def local_snapshot(source: DatasetSource) -> Path | None:
    """The Hub dataset's snapshot folder in the local Hugging Face cache, or None. Used offline (and
    whenever present for a pinned commit), so a dataset downloaded once loads without the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.hub, repo_type="dataset", revision=source.revision,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


# ---------------------------------------------------------------- identity (torch- and datasets-free)

_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, once per process for an unchanged file (size and mtime): fingerprints,
    lineage and the tokenized-data cache all ask, and a dataset can be gigabytes."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def hub_revision(repo_id: str, revision: str | None, kind: str = "datasets") -> str | None:
    """The commit a Hub branch or tag resolves to in the local cache (what loads offline), else None."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    ref = Path(cache) / f"{kind}--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def identity(source: DatasetSource | None) -> dict[str, Any] | None:
    """What the rows of a source depend on: a Hub dataset's id, subset, split and resolved revision,
    or a local source's file hashes; plus how its rows are read (format, columns, roles)."""
    if source is None:
        return None
    reading = {"format": source.format, "columns": dict(sorted(source.columns.items())),
               "roles": dict(sorted(source.roles.items()))}
    if source.hub:
        return {"hub": source.hub, "subset": source.subset, "split": source.split or "train",
                "revision": hub_revision(source.hub, source.revision), **reading}
    files = local_files(source)
    root = Path(source.path or "")
    base = root if root.is_dir() else None
    hashed = [(str(f.relative_to(base)) if base else f.name, _file_sha256(f)) for f in files]
    if len(hashed) == 1 and base is None:
        return {"sha256": hashed[0][1], **reading}
    import hashlib

    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "files": len(hashed), "split": source.split, **reading}
