"""Dataset checks and loading. Every row is checked before any model loads, so a bad row costs
seconds, not a model load; the checks import no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainpipe.errors import DatasetError

ROLES = {"system", "user", "assistant", "tool"}


def _check_messages(value: Any, where: str, key: str) -> None:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field '{key}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        for field in ("role", "content"):
            if field not in message:
                raise DatasetError(f"{where}: missing field '{key}[{i}].{field}'")
        if message["role"] not in ROLES:
            raise DatasetError(f"{where}: {key}[{i}].role '{message['role']}' is not one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise DatasetError(f"{where}: {key}[{i}].content must be a string")


def _check_text(row: dict[str, Any], key: str, where: str, *, allow_messages: bool) -> None:
    if key not in row:
        raise DatasetError(f"{where}: missing field '{key}'")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(f"{where}: field '{key}' is empty")
    elif allow_messages and isinstance(value, list):
        _check_messages(value, where, key)
    else:
        kinds = "a string or a list of messages" if allow_messages else "a string"
        raise DatasetError(f"{where}: field '{key}' must be {kinds}")


def _check_sft_row(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        _check_messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise DatasetError(f"{where}: 'messages' has no assistant turn to learn from")
        return "messages"
    if "prompt" in row or "completion" in row:
        _check_text(row, "prompt", where, allow_messages=True)
        _check_text(row, "completion", where, allow_messages=True)
        return "prompt_completion"
    if "text" in row:
        _check_text(row, "text", where, allow_messages=False)
        return "text"
    raise DatasetError(f"{where}: missing field 'messages' (or 'prompt'/'completion', or 'text')")


def _check_preference_row(row: dict[str, Any], where: str) -> str:
    for key in ("prompt", "chosen", "rejected"):
        _check_text(row, key, where, allow_messages=True)
    if row["chosen"] == row["rejected"]:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are identical")
    return "preference"


_CHECKERS = {"sft": _check_sft_row, "preference": _check_preference_row, "eval": _check_sft_row}


def _lines(file: Path):
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


def _check_readable(file: Path, kind: str) -> None:
    if file.is_dir():
        raise DatasetError(f"{file}: {kind} dataset is a directory; point it at a .jsonl file")
    if not file.is_file():
        raise DatasetError(f"{file}: {kind} dataset not found")


def validate_jsonl(path: str | Path, kind: str) -> dict[str, Any]:
    """Check every row; return {'rows': n, 'format': ...}. Raises DatasetError naming file:line."""
    file = Path(path)
    _check_readable(file, kind)
    check = _CHECKERS[kind]
    formats: set[str] = set()
    rows = 0
    try:
        for line_no, line in _lines(file):
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: each line must be a JSON object")
            formats.add(check(row, where))
            rows += 1
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read the {kind} dataset ({exc.strerror or exc})") from None
    if rows == 0:
        raise DatasetError(f"{file}: {kind} dataset is empty")
    if len(formats) > 1:
        raise DatasetError(f"{file}: rows mix formats {sorted(formats)}; use one format per file")
    return {"rows": rows, "format": formats.pop()}


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for _, line in _lines(Path(path)) if line.strip()]


def split_heldout(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic (train, held-out) split; the held-out part is never trained on."""
    import random

    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    heldout = set(random.Random(seed).sample(range(len(rows)), count))
    return ([r for i, r in enumerate(rows) if i not in heldout],
            [r for i, r in enumerate(rows) if i in heldout])


def sft_rows(config: Any) -> list[dict[str, Any]]:
    """The SFT rows trained on: all of them, less the eval split when no eval file is configured."""
    rows = load_rows(config.datasets.sft)
    if config.datasets.eval:
        return rows
    return split_heldout(rows, config.validation.eval_split, config.seed)[0]


def eval_rows(config: Any) -> list[dict[str, Any]]:
    """Held-out rows for generation checks: the eval file, else the split kept out of SFT."""
    if config.datasets.eval:
        return load_rows(config.datasets.eval)
    if not config.datasets.sft:
        return []
    return split_heldout(load_rows(config.datasets.sft), config.validation.eval_split, config.seed)[1]


def to_hf_dataset(path: str | Path, kind: str, *, rows: list[dict[str, Any]] | None = None,
                  completion_only: bool = False):
    """A `datasets.Dataset` in the shape TRL expects (conversational or standard)."""
    from datasets import Dataset

    rows = load_rows(path) if rows is None else rows
    if kind == "sft" and "messages" in rows[0] and completion_only:
        # TRL computes the loss on `completion` only, whatever the model's chat template.
        rows = [split_prompt_completion(r["messages"]) for r in rows]
    elif kind == "sft" and "messages" in rows[0]:
        # Keep only the keys TRL reads; extra per-row metadata would become columns of mixed types.
        rows = [{"messages": r["messages"]} for r in rows]
    elif kind == "sft" and "prompt" in rows[0]:
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    elif kind == "sft":
        rows = [{"text": r["text"]} for r in rows]
    else:
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
        rows = [_as_conversational(r) for r in rows]
    return Dataset.from_list(rows)


def split_prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Everything before the last assistant turn is the prompt; that turn is the completion."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _as_conversational(row: dict[str, Any]) -> dict[str, Any]:
    """TRL wants prompt/chosen/rejected all strings or all message lists; lift strings to messages."""
    if all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")):
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}

    def lift(value: Any, role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return {"prompt": lift(row["prompt"], "user"), "chosen": lift(row["chosen"], "assistant"),
            "rejected": lift(row["rejected"], "assistant")}
