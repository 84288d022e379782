"""MkDocs hook: the configuration reference, rendered from the pydantic models at build time.

`<!-- config-reference -->` in docs/configuration.md becomes one table per section of the pipeline
config (trainpipe/config/models.py: every key's dotted path, type, constraints, default and its
`Field(description=...)`), and `<!-- sweep-reference -->` the same for sweep files
(trainpipe/config/sweepfile.py). The text comes from the code, so it cannot drift from it;
tests/test_docs.py checks that every field has a description and shows up in the built page.
"""

from __future__ import annotations

import html
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # document this checkout's code, not some other installed trainpipe

import yaml  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

CONFIG_MARKER = "<!-- config-reference -->"
SWEEP_MARKER = "<!-- sweep-reference -->"

# The keys the lesson's files define ("Training Orchestration: SFT to DPO Pipeline": pipeline_config.yaml,
# sft_config.yaml, dpo_config.yaml); every other key is a trainpipe extension. tests/test_docs.py checks
# that each still names a field.
LESSON_KEYS = {
    "pipeline_id", "base_model", "output_dir", "stages", "stages[].name", "stages[].enabled",
    "stages[].config_path", "stages[].timeout_minutes", "stages[].retry_count", "validation",
    "validation.max_loss", "validation.min_accuracy", "validation.check_nan", "validation.custom_checks",
    "gpu_memory_fraction", "checkpoint_every_n_steps", "save_intermediate", "upload_to_hub", "hub_repo_id",
} | {f"{stage}.{key}" for stage in ("sft", "dpo") for key in (
    "max_seq_length", "lora_r", "lora_alpha", "lora_dropout", "epochs", "batch_size", "gradient_accumulation",
    "learning_rate", "warmup_ratio", "save_steps", "beta")}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds directly or optionally (`X`, `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            return _model_in(models[0])
    return None


def _container_of_models(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """`("[]", X)` for list[X], `(".<name>", X)` for dict[str, X], where X is a model."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and _model_in(args[0]):
        return "[]", _model_in(args[0])  # type: ignore[return-value]
    if origin is dict and len(args) == 2:
        values = typing.get_args(args[1]) if typing.get_origin(args[1]) in (typing.Union, types.UnionType) \
            else (args[1],)
        models = [_model_in(value) for value in values if _model_in(value)]
        if models:  # e.g. a sweep's space: dict[str, list | Range]
            return ".<name>", models[0]  # type: ignore[return-value]
    return None


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]"
    return str(annotation).replace("typing.", "")


def constraints(field: Any) -> str:
    words = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                words.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"at least {item.min_length} item(s)")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matches {item.pattern}")
    return ", ".join(words)


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below" if type(value).model_fields else ""
    # As it would be written in the YAML file (flow style: one line).
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def walk(model: type[BaseModel], prefix: str = "", seen: dict[type, str] | None = None):
    """(section, rows) for `model` and every model under it, in field order. A model class met a second
    time (e.g. a second dataset role) is not expanded again: its row points at the first one."""
    seen = {} if seen is None else seen
    seen.setdefault(model, prefix)
    rows, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        container = _container_of_models(field.annotation)
        child, child_prefix = (sub, f"{key}.") if sub else (container[1], f"{key}{container[0]}.") if container \
            else (None, "")
        description = field.description or ""
        if child is not None and child in seen:
            first = seen[child].rstrip(".")
            description += f" Same keys as `{first}`."
        elif child is not None:
            nested.append((child, child_prefix))
            seen[child] = child_prefix
        rows.append({"key": key, "type": type_name(field.annotation), "constraints": constraints(field),
                     "default": default_text(field), "description": description,
                     "lesson": key in LESSON_KEYS})
    sections = [(prefix.rstrip(".") or None, model, rows)]
    for child, child_prefix in nested:
        sections += walk(child, child_prefix, seen)
    return sections


def _cell(text: str) -> str:
    """A description as one table cell: `code` kept, HTML-like text (<run_id>) and emphasis characters
    outside it escaped, and a `docs/PAGE.md` mention made a link (a strict build checks the page exists)."""
    parts = re.split(r"(`[^`]*`)", text.replace("\n", " "))
    for index in range(0, len(parts), 2):
        plain = html.escape(parts[index], quote=False)
        plain = re.sub(r"([*_\[\]])", r"\\\1", plain)
        parts[index] = re.sub(r"docs/([\w-]+\.md)", r"[\1](\1)", plain)
    return "".join(parts).replace("|", "\\|")


def _code(text: str) -> str:
    """Inline HTML code, with every character Markdown would still act on (emphasis, escapes, the table's
    pipe) written as an entity."""
    if not text:
        return ""
    text = html.escape(text)
    for char in "\\*_[]`|":
        text = text.replace(char, f"&#{ord(char)};")
    return f"<code>{text}</code>"


def render(model: type[BaseModel], *, top_title: str, origin_column: bool, undocumented: str = "") -> str:
    out = []
    for section, section_model, rows in walk(model):
        out.append(f"### `{section}`" if section else f"### {top_title}")
        doc = (section_model.__doc__ or "").strip()
        if doc and section_model.__doc__ is not BaseModel.__doc__:
            out.append("")
            out.append(" ".join(line.strip() for line in doc.splitlines()))
        out.append("")
        head = ["key", "type", "default", "description"] + (["from"] if origin_column else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for row in rows:
            kind = _code(row["type"]) + (f", {html.escape(row['constraints'])}" if row["constraints"] else "")
            default = row["default"] if row["default"] in ("", "see below", "required") else _code(row["default"])
            description = _cell(row["description"]) or undocumented
            cells = [f"`{row['key']}`", kind, default, description]
            if origin_column:
                cells.append("lesson" if row["lesson"] else "trainpipe")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def config_reference() -> str:
    from trainpipe.config.models import PipelineConfig

    return render(PipelineConfig, top_title="Top level", origin_column=True)


def sweep_reference() -> str:
    from trainpipe.config.sweepfile import SweepSpec

    # sweepfile.py documents only some of its fields; the others point at the prose.
    return render(SweepSpec, top_title="Sweep file", origin_column=False,
                  undocumented="See [Sweeps](cache-and-sweeps.md#sweeps).")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    if SWEEP_MARKER in markdown:
        markdown = markdown.replace(SWEEP_MARKER, sweep_reference())
    return markdown
