"""The row shapes trainpipe reads, as one table: how each is recognised from its columns, and how a
row of it becomes one of the shapes TRL trains on. Torch-free and datasets-free: the orchestrator
checks every row with these functions before any model loads, and the stage maps them over Arrow.

Canonical shapes (what `normalize` returns):
- SFT and eval: {"messages": [...]}, {"prompt": ..., "completion": ...} (strings or message
  lists), or {"text": str};
- preference: {"prompt": [...], "chosen": [...], "rejected": [...]}, all message lists, so the
  chat template applies to string pairs too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trainpipe.errors import DatasetError

ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT exports name roles by speaker; these are the tags seen in the wild (FastChat, Vicuna,
# LLaMA-Factory's `sharegpt` formatting). `roles:` in the config adds or overrides.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


# ---------------------------------------------------------------- shared checks


def _check_messages(value: Any, where: str, key: str) -> None:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field '{key}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        for field in ("role", "content"):
            # Arrow fills a key that only some rows have with None: the same as missing.
            if message.get(field) is None:
                raise DatasetError(f"{where}: missing field '{key}[{i}].{field}'")
        if message["role"] not in ROLES:
            raise DatasetError(f"{where}: {key}[{i}].role '{message['role']}' is not one of {sorted(ROLES)}"
                               f" (map your tags with `roles:`, e.g. roles: {{{message['role']}: assistant}})")
        if not isinstance(message["content"], str):
            raise DatasetError(f"{where}: {key}[{i}].content must be a string")


def _check_text(row: Mapping[str, Any], key: str, where: str, *, allow_messages: bool) -> None:
    if key not in row or row[key] is None:
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


def _map_roles(messages: list[Any], roles: Mapping[str, str]) -> list[Any]:
    if not roles:
        return messages
    return [{**m, "role": roles.get(m.get("role"), m.get("role"))} if isinstance(m, dict) else m for m in messages]


# ---------------------------------------------------------------- one function per format


def _messages(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    messages = row["messages"]
    if isinstance(messages, list) and (roles or any(isinstance(m, dict) and len(m) != 2 for m in messages)):
        # Only role and content are kept: other keys (name, weight, ...) would become sparse Arrow columns.
        messages = [{k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m
                    for m in _map_roles(messages, roles)]
    _check_messages(messages, where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: 'messages' has no assistant turn to learn from")
    return {"messages": messages}


def _sharegpt(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: field 'conversations' must be a non-empty list of turns")
    tags = {**SHAREGPT_ROLES, **roles}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        tag = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if tag is None or value is None:
            raise DatasetError(f"{where}: conversations[{i}] needs 'from' and 'value' (or 'role' and 'content')")
        if tag not in tags:
            raise DatasetError(f"{where}: conversations[{i}].from '{tag}' is not a known role tag "
                               f"({', '.join(sorted(SHAREGPT_ROLES))}); map it with `roles:`, "
                               f"e.g. roles: {{{tag}: assistant}}")
        messages.append({"role": tags[tag], "content": value})
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _messages({"messages": messages}, where, {})


def _alpaca(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    _check_text(row, "instruction", where, allow_messages=False)
    _check_text(row, "output", where, allow_messages=False)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DatasetError(f"{where}: field 'input' must be a string")
    # Alpaca's own template joins instruction and input with a blank line; the chat template does the rest.
    user = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def _prompt_completion(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key in ("prompt", "completion"):
        value = row.get(key)
        out[key] = _map_roles(value, roles) if isinstance(value, list) else value
        _check_text(out, key, where, allow_messages=True)
    return out


def _text(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    _check_text(row, "text", where, allow_messages=False)
    return {"text": row["text"]}


def _lift(value: Any, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _preference(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    fields = {}
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        fields[key] = _map_roles(value, roles) if isinstance(value, list) else value
        _check_text(fields, key, where, allow_messages=True)
    if fields["chosen"] == fields["rejected"]:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are identical")
    chosen, rejected = fields["chosen"], fields["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list) and any(m["role"] != "assistant" for m in chosen):
        # UltraFeedback-binarized: `prompt` is a string and chosen/rejected are whole conversations that
        # repeat it. The shared turns are the prompt; what follows them is what is compared.
        return _split_conversations(chosen, rejected, where)
    return {"prompt": _lift(fields["prompt"], "user"), "chosen": _lift(chosen, "assistant"),
            "rejected": _lift(rejected, "assistant")}


def _preference_implicit(row: Mapping[str, Any], where: str, roles: Mapping[str, str]) -> dict[str, Any]:
    fields = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        fields[key] = _map_roles(value, roles) if isinstance(value, list) else value
        if isinstance(fields[key], str):
            raise DatasetError(f"{where}: missing field 'prompt'")
        if not isinstance(fields[key], list):
            raise DatasetError(f"{where}: without a 'prompt' column, '{key}' must be a conversation "
                               "(a list of messages that starts with the prompt)")
        _check_messages(fields[key], where, key)
    if fields["chosen"] == fields["rejected"]:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are identical")
    return _split_conversations(fields["chosen"], fields["rejected"], where)


def _split_conversations(chosen: list[dict], rejected: list[dict], where: str) -> dict[str, Any]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' share no opening turns, so no prompt can be "
                           "taken from them; add a 'prompt' column")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class RowFormat:
    name: str
    kind: str                      # "sft" (also used for eval rows) or "preference"
    columns: tuple[str, ...]       # all present: this format is detected
    normalize: Callable[[Mapping[str, Any], str, Mapping[str, str]], dict[str, Any]]
    description: str


# Detection takes the first entry whose columns a row has, so a more specific shape comes first
# (UltraFeedback rows have prompt/chosen/rejected *and* conversations in chosen).
FORMATS: tuple[RowFormat, ...] = (
    RowFormat("messages", "sft", ("messages",), _messages, "chat `messages` with role/content"),
    RowFormat("sharegpt", "sft", ("conversations",), _sharegpt, "ShareGPT `conversations` with from/value"),
    RowFormat("alpaca", "sft", ("instruction", "output"), _alpaca, "Alpaca instruction/input/output"),
    RowFormat("prompt_completion", "sft", ("prompt", "completion"), _prompt_completion, "prompt/completion"),
    RowFormat("text", "sft", ("text",), _text, "plain `text` (the loss is on every token)"),
    RowFormat("preference", "preference", ("prompt", "chosen", "rejected"), _preference,
              "prompt/chosen/rejected, strings or message lists (UltraFeedback's whole conversations too)"),
    RowFormat("preference_implicit", "preference", ("chosen", "rejected"), _preference_implicit,
              "chosen/rejected conversations that both start with the prompt"),
)
BY_NAME = {f.name: f for f in FORMATS}
_BY_KIND = {kind: tuple(f for f in FORMATS if f.kind == kind) for kind in ("sft", "preference")}


def kind_of(role: str) -> str:
    """The row kind a dataset role holds: eval rows are chat rows like SFT's, preference_eval pairs
    like preference."""
    return "preference" if role.startswith("preference") else "sft"


def formats_for(role: str) -> tuple[RowFormat, ...]:
    return _BY_KIND[kind_of(role)]


def detect(columns: set[str] | Mapping[str, Any], role: str, where: str) -> RowFormat:
    """The first format of the role's kind whose columns are all present."""
    candidates = formats_for(role)
    for fmt in candidates:
        if all(column in columns for column in fmt.columns):
            return fmt
    names = set(columns)
    # A row that has part of a format's columns is that format with a field missing: its own check
    # then names the field, which says more than "no known format".
    for fmt in candidates:
        if names & set(fmt.columns):
            return fmt
    if role.startswith("preference"):
        # The message users of the lesson format know: name the first column missing.
        missing = next(key for key in ("prompt", "chosen", "rejected") if key not in names)
        raise DatasetError(f"{where}: missing field '{missing}'")
    shapes = "; ".join(f"{'/'.join(f.columns)} ({f.name})" for f in formats_for(role))
    raise DatasetError(f"{where}: no known row format in columns {sorted(names)}; expected one of: {shapes}. "
                       "Set `format:` and map your columns with `columns:` (e.g. columns: {messages: dialog})")


def choose(explicit: str, columns: set[str] | Mapping[str, Any], role: str, where: str) -> RowFormat:
    if explicit == "auto":
        return detect(columns, role, where)
    fmt = BY_NAME[explicit]
    if fmt.kind != kind_of(role):
        allowed = ", ".join(f.name for f in formats_for(role))
        raise DatasetError(f"{where}: format '{explicit}' is not a {role} format; use one of {allowed}")
    missing = [c for c in fmt.columns if c not in set(columns)]
    if missing:
        raise DatasetError(f"{where}: format '{explicit}' needs column(s) {missing}, not in {sorted(set(columns))}; "
                           "map yours with `columns:`")
    return fmt


def rename_columns(row: Mapping[str, Any], columns: Mapping[str, str]) -> Mapping[str, Any]:
    """Apply `columns:` (trainpipe's name -> the source's) to one row."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in out:
            out[ours] = out.pop(theirs)
    return out


def split_prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Everything before the last assistant turn is the prompt; that turn is the completion."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}
