"""What a stage will train on, shown before paying for a run (`trainpipe data`, `trainpipe run
--dry-run`): per dataset its source, detected format and row count, and the first example rendered
through the model's chat template with the tokens that carry loss marked.

The split into loss and no-loss tokens follows TRL's rule: for a prompt/completion example, the
prompt rendered with the generation prompt is the no-loss prefix (SFT with completion_only_loss;
DPO's prompt); for `messages` without completion_only_loss and for `text`, every token carries loss.
"""

from __future__ import annotations

from typing import Any

from trainpipe.stages.data import dataset_roles, first_rows, split_prompt_completion, validate


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _pieces(tokenizer: Any, ids: list[int], loss_from: int, max_length: int) -> list[dict[str, Any]]:
    return [{"token": tokenizer.decode([token]), "id": int(token), "loss": index >= loss_from,
             "truncated": index >= max_length} for index, token in enumerate(ids)]


def render_example(row: dict[str, Any], role: str, tokenizer: Any, *, completion_only: bool,
                   max_length: int) -> dict[str, list[dict[str, Any]]]:
    """{part: [token pieces]} for one canonical row: `text` for SFT, `chosen`/`rejected` for pairs."""
    if role.startswith("preference"):
        prompt_ids = _chat_ids(tokenizer, row["prompt"], generation_prompt=True)
        out = {}
        for part in ("chosen", "rejected"):
            full = _chat_ids(tokenizer, row["prompt"] + row[part])
            out[part] = _pieces(tokenizer, full, _common_prefix(prompt_ids, full), max_length)
        return out
    if "text" in row:
        ids = list(tokenizer(row["text"] + (tokenizer.eos_token or ""))["input_ids"])
        return {"text": _pieces(tokenizer, ids, 0, max_length)}
    if "messages" in row:
        if not completion_only:
            return {"text": _pieces(tokenizer, _chat_ids(tokenizer, row["messages"]), 0, max_length)}
        row = split_prompt_completion(row["messages"])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt + completion)["input_ids"])
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    else:
        prompt_ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
        ids = _chat_ids(tokenizer, prompt + completion)
    start = _common_prefix(prompt_ids, ids) if completion_only else 0
    return {"text": _pieces(tokenizer, ids, start, max_length)}


def preview(config: Any) -> list[dict[str, Any]]:
    """One entry per dataset role the config reads. Checks every row (as `trainpipe run` does)."""
    from trainpipe.stages.loading import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(config.base_model), config)
    out = []
    for role in dataset_roles(config):
        source = getattr(config.datasets, role)
        checked = validate(source, role)
        settings = config.dpo if role.startswith("preference") else config.sft
        completion_only = bool(getattr(settings, "completion_only_loss", True))
        row = first_rows(source, "eval" if role == "eval" else role, 1)[0]
        rendered = render_example(row, role, tokenizer, completion_only=completion_only,
                                  max_length=settings.max_seq_length)
        out.append({"role": role, "source": source.label(), "format": checked["format"], "rows": checked["rows"],
                    "check_seconds": checked["seconds"], "max_length": settings.max_seq_length,
                    "loss": ("none, held out for the gate (the reply is what the model's output is compared with)"
                             if role.endswith("eval")
                             else "on the completion only" if completion_only or role == "preference"
                             else "on every token"),
                    "example": rendered,
                    "tokens": {part: len(pieces) for part, pieces in rendered.items()},
                    "loss_tokens": {part: sum(p["loss"] for p in pieces) for part, pieces in rendered.items()}})
    return out
