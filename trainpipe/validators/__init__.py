"""Validation gates. The table of which checks run where is `registry.GATES`; this module turns it
into a list of `Check`s for a run's config and evaluates it."""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

from trainpipe.config import PipelineConfig
from trainpipe.validators.gate import Check, CheckResult, GateContext, GateOutcome, Outcome, run_gate
from trainpipe.validators.registry import GATES, final_gate_stage, specs_for

__all__ = ["GATES", "Check", "CheckResult", "GateContext", "GateOutcome", "Outcome", "checks_for", "evaluate",
           "final_gate_stage", "run_gate"]


def _function(dotted: str) -> Any:
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def checks_for(stage: str, config: PipelineConfig) -> list[Check]:
    """The gate's checks with `validation.checks.<name>` overrides applied; severity `off` drops one."""
    found = []
    for spec in specs_for(stage, config):
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
