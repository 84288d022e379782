"""Sweep files (`trainpipe sweep SWEEP.yaml`), validated when loaded: every error names the file and
the key, and nothing is written before the whole file checks out.

    base: quickstart.yaml          # the pipeline config every trial starts from
    space:                         # stage keys -> a list, or a range {low, high[, log][, step]}
      dpo.beta: [0.05, 0.1, 0.2]
      sft.learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
    strategy: grid                 # grid | random | tpe
    objective: {metric: dpo.rewards/accuracies, direction: maximize}
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainpipe.config.loading import _format_validation_error, _read_yaml, _resolve_relative, load_config
from trainpipe.config.models import STAGE_SETTINGS, PipelineConfig
from trainpipe.errors import ConfigError

# What each stage reports in its metrics (stages/sft.py, merge.py, dpo.py): the objective may name these.
STAGE_METRICS = {
    "sft": ("final_loss", "train_loss", "epochs_completed", "samples_processed"),
    "merge": ("size_gb", "merge_time_seconds"),
    "dpo": ("final_loss", "first_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
            "rewards/rejected"),
}
SPACE_ROOTS = ("seed",)  # top-level keys a sweep may vary besides stage settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """Integers when low, high (and step) are written as integers, else floats."""

    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = Field(None, gt=0)

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)


class Objective(_Strict):
    metric: str = Field(description="'<stage>.<metric>' (e.g. dpo.rewards/accuracies) or 'gate.<check>' "
                                    "(a check's value, e.g. gate.output_format_valid).")
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("direction", mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        return {"max": "maximize", "min": "minimize"}.get(value, value)


class SweepSpec(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,60}$",
                             description="Prefix of the sweep id; default '<pipeline_id>-sweep'.")
    base: str = Field(description="Pipeline config of every trial; relative to the sweep file or the cwd.")
    set: list[str] = Field(default_factory=list, description="--set overrides applied to every trial.")
    space: dict[str, list[Any] | Range]
    strategy: Literal["grid", "random", "tpe"] = "grid"
    n_trials: int | None = Field(None, ge=1, description="random and tpe: how many trials.")
    seed: int = Field(0, description="Sampler seed (the trials' own seed is the pipeline's `seed`).")
    objective: Objective
    max_trials: int = Field(50, ge=1, description="Refuse a sweep that would run more trials than this.")


def _known_space_keys() -> list[str]:
    keys = [f"{stage}.{field}" for stage, model in STAGE_SETTINGS.items() for field in model.model_fields]
    return keys + list(SPACE_ROOTS)


def _yaml_scalar(value: Any) -> str:
    """A value as `--set` parses it back (YAML): 1e-05 must be written 1.0e-05 to stay a float."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def param_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={_yaml_scalar(value)}" for key, value in sorted(params.items())]


def grid_size(spec: SweepSpec) -> int:
    return math.prod(len(v) for v in spec.space.values() if isinstance(v, list))


def trial_count(spec: SweepSpec) -> int:
    return grid_size(spec) if spec.strategy == "grid" else int(spec.n_trials or 0)


def load_sweep(path: str | os.PathLike[str], *, extra_sets: list[str] | None = None,
               cwd: str | os.PathLike[str] | None = None) -> tuple[SweepSpec, PipelineConfig]:
    """The validated sweep (its `base` made absolute, `extra_sets` appended to `set`) and the base
    pipeline config. ConfigError names the file and key of the first problem; nothing is written."""
    sweep_path = Path(path)
    where = str(sweep_path)
    work_dir = Path(cwd) if cwd else Path.cwd()
    raw = _read_yaml(sweep_path, what="sweep file")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, SweepSpec, where)) from None
    base = _resolve_relative(spec.base, sweep_path.resolve().parent, work_dir)
    if base is None or not base.is_file():
        raise ConfigError(f"{where}: key 'base': pipeline config '{spec.base}' does not exist "
                          f"(looked relative to {work_dir} and to {sweep_path.resolve().parent})")
    spec.base = str(base)
    spec.set = list(spec.set) + list(extra_sets or [])
    try:
        config = load_config(base, overrides=spec.set, cwd=work_dir)
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'base' ({base}) or 'set': {exc.message}") from None
    # Trials must not depend on where `sweep --resume` runs from: pin the resolved output dir.
    spec.set.append(f"output_dir={config.output_dir}")

    if not spec.space:
        raise ConfigError(f"{where}: key 'space' is empty; name at least one key to vary, e.g. dpo.beta: [0.05, 0.1]")
    known = _known_space_keys()
    for key, values in spec.space.items():
        label = f"{where}: key 'space.{key}'"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{label}: unknown key{hint}; a sweep varies stage settings "
                              f"(sft.*, merge.*, dpo.*) or seed")
        stage = key.split(".", 1)[0]
        if stage in STAGE_SETTINGS and not config.enabled(stage):
            raise ConfigError(f"{label}: stage '{stage}' is disabled in {base}, so this key changes nothing")
        if isinstance(values, list):
            if not values:
                raise ConfigError(f"{label}: empty list of values")
            samples = values
        else:
            if values.low > values.high:
                raise ConfigError(f"{label}: low {values.low} is above high {values.high}")
            if values.log and (values.low <= 0 or values.step is not None):
                raise ConfigError(f"{label}: a log range needs low > 0 and no step")
            if spec.strategy == "grid":
                raise ConfigError(f"{label}: strategy 'grid' needs a list of values, not a range "
                                  "(use strategy random or tpe, or list the values)")
            samples = [values.low, values.high]
        for value in samples:
            try:
                load_config(base, overrides=spec.set + param_overrides({key: value}), cwd=work_dir)
            except ConfigError as exc:
                raise ConfigError(f"{label}: value {value!r} is not accepted: {exc.message}") from None

    if spec.strategy == "grid":
        if spec.n_trials is not None and spec.n_trials != grid_size(spec):
            raise ConfigError(f"{where}: key 'n_trials': a grid runs every combination ({grid_size(spec)}); "
                              "leave n_trials out")
    elif spec.n_trials is None:
        raise ConfigError(f"{where}: key 'n_trials': strategy '{spec.strategy}' needs n_trials")
    count = trial_count(spec)
    if count > spec.max_trials:
        what = f"the grid has {count} combinations" if spec.strategy == "grid" else f"n_trials is {count}"
        raise ConfigError(f"{where}: key 'max_trials': {what}, more than max_trials {spec.max_trials}; "
                          "shrink the space or raise max_trials")
    _check_objective(spec, config, where)
    return spec, config


def _check_objective(spec: SweepSpec, config: PipelineConfig, where: str) -> None:
    metric = spec.objective.metric
    label = f"{where}: key 'objective.metric'"
    kind, _, name = metric.partition(".")
    if kind == "gate":
        # The check names only: checks_for() would import each check's module, and with it torch.
        from trainpipe.validators.registry import GATES, specs_for

        checks = config.validation.checks
        produced = {spec.name for stage in GATES if config.enabled(stage) for spec in specs_for(stage, config)
                    if not (spec.name in checks and checks[spec.name].severity == "off")}
        if name not in produced:
            close = difflib.get_close_matches(name, sorted(produced), n=1)
            hint = f" (did you mean 'gate.{close[0]}'?)" if close else ""
            raise ConfigError(f"{label}: no gate of this pipeline runs a check '{name}'{hint}")
        return
    if kind not in STAGE_METRICS:
        raise ConfigError(f"{label}: '{metric}' must be '<stage>.<metric>' (stage sft, merge or dpo) or "
                          "'gate.<check>'")
    if not config.enabled(kind):
        raise ConfigError(f"{label}: stage '{kind}' is disabled in {spec.base}, so nothing produces '{metric}'")
    if name not in STAGE_METRICS[kind]:
        close = difflib.get_close_matches(name, STAGE_METRICS[kind], n=1)
        hint = f" (did you mean '{kind}.{close[0]}'?)" if close else ""
        raise ConfigError(f"{label}: stage {kind} produces no metric '{name}'{hint}; it reports "
                          f"{', '.join(STAGE_METRICS[kind])}")
