"""Loading a pipeline config: the YAML files, `--set` overrides, relative paths, and errors that name
the file and key."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


from trainpipe.config.datasets import DatasetPaths, DatasetSource
from trainpipe.config.models import STAGE_ORDER, STAGE_SETTINGS, PipelineConfig
from trainpipe.errors import ConfigError


def _read_yaml(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _resolve_relative(value: str, config_dir: Path, cwd: Path) -> Path | None:
    """The lesson's paths are relative to the directory the user runs from; fall back to the config's own."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return path if path.exists() else None
    for base in (cwd, config_dir):
        if (base / path).exists():
            return (base / path).resolve()
    return None


def _resolve_dataset_path(value: str, config_dir: Path, cwd: Path) -> str | None:
    """Like _resolve_relative, for a path that may be a glob: absolute, and matching at least one file."""
    import glob

    if not glob.has_magic(value):
        found = _resolve_relative(value, config_dir, cwd)
        return str(found) if found is not None else None
    pattern = os.path.expanduser(value)
    for base in ([Path("/")] if os.path.isabs(pattern) else [cwd, config_dir]):
        absolute = str((base / pattern)) if not os.path.isabs(pattern) else pattern
        if glob.glob(absolute, recursive=True):
            return os.path.normpath(absolute)
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of an error location."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or [])]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return None
    return current if isinstance(current, type) else None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_validation_error(exc: ValidationError, model: type[BaseModel], source: str,
                             override_keys: dict[str, str] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
        key = _format_loc(loc) or "(top level)"
        origin = source
        for dotted, raw in (override_keys or {}).items():
            if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
                origin = f"--set {raw}"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            choices = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1, cutoff=0.6)
            suggestion = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"{origin}: unknown key '{key}'{suggestion}")
        elif err["type"] == "missing":
            lines.append(f"{origin}: missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
            lines.append(f"{origin}: key '{key}': {msg}{shown}")
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, e.g. --set sft.learning_rate=1e-4")
    key, _, raw_value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return parts, value


def _apply_override(raw: dict[str, Any], parts: list[str], value: Any, text: str) -> str:
    """Apply one --set; return the key as validation errors will spell it (stages by index)."""
    node: Any = raw
    resolved: list[Any] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            # `stages.sft.enabled=false` addresses a stage by name, `stages.0.enabled` by index
            match = next((s for s in node if isinstance(s, dict) and s.get("name") == part), None)
            if match is None and part.isdigit() and int(part) < len(node):
                match = node[int(part)]
            if match is None:
                raise ConfigError(f"--set {text}: no stage '{part}' in stages")
            if last:
                raise ConfigError(f"--set {text}: cannot replace a whole stage entry")
            resolved.append(node.index(match))
            node = match
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text}: '{'.'.join(parts[:i])}' is not a mapping")
        resolved.append(part)
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
    return _format_loc(tuple(resolved))


def load_config(
    path: str | os.PathLike[str],
    *,
    overrides: list[str] | None = None,
    sft_dataset: str | None = None,
    preference_dataset: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> PipelineConfig:
    """Load, merge and validate a pipeline config. Paths in the result are absolute.

    Raises ConfigError with a message that names the file and key; nothing is written.
    """
    config_path = Path(path)
    work_dir = Path(cwd) if cwd else Path.cwd()
    raw = _read_yaml(config_path, what="pipeline config")
    config_dir = config_path.resolve().parent

    stages = raw.get("stages")
    if isinstance(stages, list):
        for index, entry in enumerate(stages):
            if not isinstance(entry, dict) or not entry.get("config_path"):
                continue
            name = entry.get("name")
            settings_model = STAGE_SETTINGS.get(name)
            found = _resolve_relative(str(entry["config_path"]), config_dir, work_dir)
            if found is None:
                raise ConfigError(
                    f"{config_path}: key 'stages[{index}].config_path': file '{entry['config_path']}' does not exist "
                    f"(looked relative to {work_dir} and to {config_dir})"
                )
            entry["config_path"] = str(found)
            stage_raw = _read_yaml(found, what=f"{name} stage config")
            if settings_model is not None:
                try:
                    settings_model.model_validate(stage_raw)
                except ValidationError as exc:
                    raise ConfigError(_format_validation_error(exc, settings_model, str(found))) from None
                inline = raw.get(name) if isinstance(raw.get(name), dict) else {}
                raw[name] = {**stage_raw, **inline}

    override_keys: dict[str, str] = {}
    for text in overrides or []:
        parts, value = _parse_override(text)
        override_keys[_apply_override(raw, parts, value, text)] = text

    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, PipelineConfig, str(config_path), override_keys)) from None

    for flag, role, value in (("--sft-dataset", "sft", sft_dataset), ("--preference-dataset", "preference",
                                                                      preference_dataset)):
        if value:
            try:
                setattr(config.datasets, role, DatasetSource.model_validate(value))
            except ValidationError as exc:
                raise ConfigError(f"{flag} {value}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    for field in DatasetPaths.model_fields:
        source = getattr(config.datasets, field)
        if source is None or not source.path:
            continue
        found = _resolve_dataset_path(source.path, config_dir, work_dir)
        if found is None:
            raise ConfigError(f"{config_path}: key 'datasets.{field}': file '{source.path}' does not exist")
        source.path = found

    if config.validation.redteam_file:
        found = _resolve_relative(config.validation.redteam_file, config_dir, work_dir)
        if found is None:
            raise ConfigError(f"{config_path}: key 'validation.redteam_file': file "
                              f"'{config.validation.redteam_file}' does not exist")
        config.validation.redteam_file = str(found)

    out = Path(os.path.expanduser(config.output_dir))
    config.output_dir = str(out if out.is_absolute() else (work_dir / out).resolve())
    if config.base_model and not config.base_model.startswith("builtin:"):
        local = _resolve_relative(config.base_model, config_dir, work_dir)
        if local is not None and local.is_dir():
            config.base_model = str(local)

    needs_sft = config.enabled("sft")
    needs_pref = config.enabled("dpo")
    if needs_sft and not config.datasets.sft:
        raise ConfigError(f"{config_path}: stage 'sft' is enabled but no SFT dataset is set "
                          "(datasets.sft in the config, or --sft-dataset)")
    if needs_pref and not config.datasets.preference:
        raise ConfigError(f"{config_path}: stage 'dpo' is enabled but no preference dataset is set "
                          "(datasets.preference in the config, or --preference-dataset)")
    return config


def ineffective_overrides(config: PipelineConfig, overrides: list[str]) -> list[str]:
    """Notes for `--set`s under a stage this run skips. They were validated like any other key (a typo
    or a bad value is still an error), but would change nothing: say so rather than let the user
    think a disabled stage was tuned."""
    notes = []
    for text in overrides:
        parts, _ = _parse_override(text)
        stage = None
        if parts[0] in STAGE_SETTINGS:
            stage = parts[0]
        elif parts[0] == "stages" and len(parts) > 2 and parts[2] != "enabled":
            stage = parts[1] if parts[1] in STAGE_ORDER else next(
                (s.name for i, s in enumerate(config.stages) if str(i) == parts[1]), None)
        if stage is not None and not config.enabled(stage):
            notes.append(f"--set {text} has no effect: stage '{stage}' is disabled in this run")
    return notes


def config_from_snapshot(snapshot: dict[str, Any]) -> PipelineConfig:
    """Rebuild a config from the ledger's snapshot (already resolved and absolute)."""
    return PipelineConfig.model_validate(snapshot)
