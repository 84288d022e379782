"""Dataset checks and loading. Every row is checked before any model loads, so a bad row costs
seconds, not a model load. The checks stream (one row, or one Arrow batch, at a time) and import
no torch; local JSONL never even imports `datasets`.

The stage side builds Arrow-backed datasets in the shapes TRL trains on (`training_dataset`), and
the gates read small held-out samples as Python rows (`eval_rows`, `preference_eval_rows`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainpipe.config import DatasetSource
from trainpipe.errors import DatasetError
from trainpipe.stages import formats, sources
from trainpipe.stages.formats import split_prompt_completion  # noqa: F401 - the gates import it from here


def _as_source(source: DatasetSource | str | Path) -> DatasetSource:
    return source if isinstance(source, DatasetSource) else DatasetSource.model_validate(str(source))


def validate(source: DatasetSource | str | Path, role: str,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check every row; return {'rows': n, 'format': name, 'seconds': s}. Raises DatasetError naming
    the config key the user edits (datasets.ROLE, or its command-line option) and file:line (text
    files) or the row index (everything else)."""
    try:
        return _validate(source, role, progress)
    except DatasetError as exc:
        option = {"sft": " or --sft-dataset", "preference": " or --preference-dataset"}.get(role, "")
        raise DatasetError(f"{exc.message} (set by datasets.{role}{option})", hint=exc.hint) from None


def _validate(source: DatasetSource | str | Path, role: str,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    source = _as_source(source)
    started = time.perf_counter()
    if source.path and not source.hub:
        path = Path(source.path)
        if not path.exists() and not any(c in str(path) for c in "*?["):
            raise DatasetError(f"{path}: {role} dataset not found")
    chosen: formats.RowFormat | None = None
    seen: set[str] = set()
    rows = 0
    try:
        for where, raw in sources.iter_rows(source):
            row = formats.rename_columns(raw, source.columns)
            fmt = (formats.detect(row, role, where) if source.format == "auto"
                   else chosen or formats.choose(source.format, row, role, where))
            fmt.normalize(row, where, source.roles)
            seen.add(fmt.name)
            if chosen is not None and fmt is not chosen:
                raise DatasetError(f"{source.path or source.hub}: rows mix formats {sorted(seen)}; "
                                   "use one format per file")
            chosen = fmt
            rows += 1
            if progress is not None and rows % 50_000 == 0:
                progress(rows)
    except OSError as exc:
        raise DatasetError(f"{source.label()}: cannot read the {role} dataset ({exc.strerror or exc})") from None
    if rows == 0 or chosen is None:
        raise DatasetError(f"{source.label()}: {role} dataset is empty")
    return {"rows": rows, "format": chosen.name, "seconds": round(time.perf_counter() - started, 3)}


def validate_jsonl(path: str | Path, kind: str) -> dict[str, Any]:
    """`validate` for one local file; kept for the lesson-era callers and tests."""
    result = validate(path, kind)
    return {"rows": result["rows"], "format": result["format"]}


def dataset_roles(config: Any) -> list[str]:
    """The dataset roles this config reads: training sets of enabled stages and every held-out set."""
    roles = []
    if config.enabled("sft"):
        roles.append("sft")
    if config.enabled("dpo"):
        roles.append("preference")
        if config.datasets.preference_eval:
            roles.append("preference_eval")
    if config.datasets.eval:
        roles.append("eval")
    return roles


# ---------------------------------------------------------------- held-out splits


def heldout_indices(count: int, fraction: float, seed: int) -> set[int]:
    """A deterministic held-out set of row indices; those rows are never trained on."""
    if fraction <= 0 or count < 2:
        return set()
    size = min(count - 1, max(1, round(count * fraction)))
    return set(random.Random(seed).sample(range(count), size))


def split_heldout(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    heldout = heldout_indices(len(rows), fraction, seed)
    return ([r for i, r in enumerate(rows) if i not in heldout], [r for i, r in enumerate(rows) if i in heldout])


def _split_of(config: Any, role: str) -> tuple[float, DatasetSource | None]:
    """The held-out fraction of a training role, and the separate held-out source that replaces it."""
    if role == "sft":
        return config.validation.eval_split, config.datasets.eval
    return config.validation.preference_eval_split, config.datasets.preference_eval


def split_spec(config: Any, role: str) -> dict[str, Any]:
    """What decides which rows of a training role are trained on (for cache keys)."""
    fraction, separate = _split_of(config, role)
    return {"fraction": 0.0 if separate else fraction, "seed": config.seed}


# ---------------------------------------------------------------- Arrow datasets for the stages


def normalized(source: DatasetSource, role: str):
    """The source as an Arrow dataset in the canonical shape of its format (stages/formats.py)."""
    dataset = sources.load(source)
    if source.columns:
        present = {theirs: ours for ours, theirs in source.columns.items() if theirs in dataset.column_names}
        dataset = dataset.rename_columns(present)
    fmt = formats.choose(source.format, set(dataset.column_names), role, source.label())
    roles = dict(source.roles)

    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        keys = list(batch)
        out: dict[str, list[Any]] = {}
        for values in zip(*(batch[k] for k in keys)):
            for key, value in fmt.normalize(dict(zip(keys, values)), source.label(), roles).items():
                out.setdefault(key, []).append(value)
        return out

    return dataset.map(convert, batched=True, remove_columns=dataset.column_names,
                       desc=f"Reading {role} rows as {fmt.name}")


def training_dataset(config: Any, role: str, *, completion_only: bool = False):
    """The rows a stage trains on, Arrow-backed, in the shape TRL expects: all of them, less the
    held-out split when no separate held-out source is configured."""
    dataset = normalized(getattr(config.datasets, role), role)
    fraction, separate = _split_of(config, role)
    if separate is None:
        heldout = heldout_indices(len(dataset), fraction, config.seed)
        if heldout:
            dataset = dataset.select([i for i in range(len(dataset)) if i not in heldout])
    if role == "sft" and completion_only and "messages" in dataset.column_names:
        # TRL computes the loss on `completion` only, whatever the model's chat template.
        dataset = dataset.map(lambda row: split_prompt_completion(row["messages"]), remove_columns=["messages"],
                              desc="Splitting the last assistant turn off as the completion")
    return dataset


def heldout_dataset(config: Any, role: str):
    """Held-out rows of a training role as an Arrow dataset (DPO's evaluation pairs), at most
    validation.max_eval_rows of them; None when nothing is held out."""
    fraction, separate = _split_of(config, role)
    if separate is not None:
        dataset = normalized(separate, f"{role}_eval")
    elif fraction > 0:
        dataset = normalized(getattr(config.datasets, role), role)
        dataset = dataset.select(sorted(heldout_indices(len(dataset), fraction, config.seed)))
    else:
        return None
    limit = config.validation.max_eval_rows
    if len(dataset) > limit:
        dataset = dataset.select(sorted(random.Random(config.seed).sample(range(len(dataset)), limit)))
    return dataset


def prepare_with_cache(ctx: Any, role: str, build: Callable[[], Any], tokenizer: Any,
                       settings: dict[str, Any]):
    """(dataset to hand the trainer, its cache entry): the verified tokenized copy when there is one,
    else the normalized rows that TRL will tokenize (and the entry will store)."""
    from trainpipe.stages.data_cache import Entry, key_for

    # A held-out set depends on the training source too when it is split off it.
    training_role = "preference" if role.startswith("preference") else "sft"
    identity = {"train": sources.identity(getattr(ctx.config.datasets, training_role)),
                "heldout": sources.identity(_split_of(ctx.config, training_role)[1])}
    split = {**split_spec(ctx.config, training_role), "max_eval_rows": ctx.config.validation.max_eval_rows}
    entry = Entry(role, key_for(role, ctx.spec.stage, identity, split, tokenizer, settings))
    cached = entry.lookup(ctx.events)
    if cached is not None:
        return cached, entry
    ctx.events.emit("data", role=role, phase="load", action="started")
    started = time.perf_counter()
    dataset = build()
    if dataset is not None:
        ctx.events.emit("data", role=role, phase="load", action="done", rows=len(dataset),
                        seconds=round(time.perf_counter() - started, 3))
        entry.record["load_seconds"] = round(time.perf_counter() - started, 3)
    return dataset, entry


# ---------------------------------------------------------------- small held-out samples for the gates


def _rows(source: DatasetSource, role: str, keep: set[int] | None = None, limit: int | None = None) -> list[dict]:
    out = []
    fmt: formats.RowFormat | None = None
    for index, (where, raw) in enumerate(sources.iter_rows(source)):
        if keep is not None and index not in keep:
            continue
        row = formats.rename_columns(raw, source.columns)
        fmt = fmt or formats.choose(source.format, row, role, where)
        out.append(fmt.normalize(row, where, source.roles))
        if limit is not None and len(out) >= limit:
            break
    return out


def _sampled(rows: list[dict], limit: int, seed: int) -> list[dict]:
    if len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def first_rows(source: DatasetSource, role: str, limit: int) -> list[dict[str, Any]]:
    return _rows(source, role, limit=limit)


def _heldout_rows(config: Any, role: str, kind: str) -> list[dict[str, Any]]:
    fraction, separate = _split_of(config, role)
    limit = config.validation.max_eval_rows
    if separate is not None:
        return _sampled(_rows(separate, kind), limit, config.seed)
    source = getattr(config.datasets, role)
    if source is None or fraction <= 0:
        return []
    count = sum(1 for _ in sources.iter_rows(source))
    picked = heldout_indices(count, fraction, config.seed)
    return _sampled(_rows(source, role, keep=picked), limit, config.seed)


def eval_rows(config: Any) -> list[dict[str, Any]]:
    """Held-out chat rows for generation checks: the eval source, else the split kept out of SFT
    (at most validation.max_eval_rows of them)."""
    return _heldout_rows(config, "sft", "eval")


def preference_eval_rows(config: Any) -> list[dict[str, Any]]:
    """Held-out preference pairs for gate 3's alignment check, canonical (message lists); [] if none."""
    return _heldout_rows(config, "preference", "preference_eval")


def has_preference_eval(config: Any) -> bool:
    return config.datasets.preference_eval is not None or config.validation.preference_eval_split > 0


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a local JSONL file as it is (the red-team prompts, the built-in model's recipe)."""
    return [row for _where, row in sources.jsonl_rows(Path(path))]
