"""Validation gates. The table of which checks run where is `registry.GATES`; this module turns it
into a list of `Check`s for a run's config and evaluates it."""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

from trainpipe.config import PipelineConfig
from trainpipe.validators.gate import Check, CheckResult, GateContext, GateOutcome, Outcome, run_gate
from trainpipe.validators.registry import CUSTOM_DEFAULTS, GATES, NAMED_BUILTINS, CheckSpec

__all__ = ["GATES", "Check", "CheckResult", "GateContext", "GateOutcome", "Outcome", "checks_for", "evaluate",
           "final_gate_stage", "run_gate"]


def final_gate_stage(config: PipelineConfig) -> str | None:
    """Custom checks run at the gate of the last enabled stage: they judge the finished model."""
    enabled = [s.name for s in config.stages if s.enabled and s.name in GATES]
    return enabled[-1] if enabled else None


def _specs_for(stage: str, config: PipelineConfig) -> list[CheckSpec]:
    specs = list(GATES[stage][1])
    if not config.validation.check_nan:
        specs = [s for s in specs if s.name != "no_nan"]
    if stage == final_gate_stage(config):
        present = {s.name for s in specs}
        extra = []
        for name in config.validation.custom_checks:
            if name in present:
                continue
            present.add(name)
            extra.append(NAMED_BUILTINS[name] if name in NAMED_BUILTINS else CheckSpec(name, name, **CUSTOM_DEFAULTS))
        # Safety runs last so that it also sees what custom checks generated.
        last = [s for s in specs + extra if s.name == "no_harmful_content"]
        specs = [s for s in specs + extra if s.name != "no_harmful_content"] + last
    return specs


def _function(dotted: str) -> Any:
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def checks_for(stage: str, config: PipelineConfig) -> list[Check]:
    """The gate's checks with `validation.checks.<name>` overrides applied; severity `off` drops one."""
    found = []
    for spec in _specs_for(stage, config):
        override = config.validation.checks.get(spec.name)
        if override is not None:
            spec = replace(spec, timeout_s=override.timeout_s or spec.timeout_s,
                           severity=override.severity or spec.severity)
        if spec.severity == "off":
            continue
        found.append(Check(spec.name, _function(spec.function), mode=spec.mode, timeout_s=spec.timeout_s,
                           severity=spec.severity, needs_model=spec.needs_model))
    return found


def evaluate(ctx: GateContext) -> GateOutcome | None:
    """Run the gate for ctx.stage; None when the stage has no gate."""
    if ctx.stage not in GATES:
        return None
    return run_gate(GATES[ctx.stage][0], checks_for(ctx.stage, ctx.config), ctx)
