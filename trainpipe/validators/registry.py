"""Which checks make up each gate, as plain data.

Functions are named by dotted path so that this table, and the config that validates check names
against it, import nothing heavy. Order matters: parallel checks run together first, then the
sequential ones one by one in the order listed. `no_harmful_content` always runs last in its gate
because it also scans what the checks before it generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainpipe.config import PipelineConfig


@dataclass(frozen=True)
class CheckSpec:
    name: str
    function: str                  # "package.module:function", called with a GateContext
    mode: str = "sequential"       # "parallel" (cheap, independent) or "sequential" (ordered)
    timeout_s: float = 60.0
    severity: str = "error"        # "error" fails the gate, "warn" is only reported
    needs_model: bool = False      # the gate loads its model once, before any such check starts


def _spec(name: str, module: str, **kw) -> CheckSpec:
    return CheckSpec(name, f"trainpipe.validators.{module}:{name}", **kw)


GATES: dict[str, tuple[str, list[CheckSpec]]] = {
    "sft": ("gate1_sft", [
        _spec("adapter_files_exist", "sft_gate", mode="parallel", timeout_s=30),
        _spec("adapter_loads", "sft_gate", mode="parallel", timeout_s=600),
        _spec("loss_below_max", "sft_gate", timeout_s=30),
        _spec("no_nan", "sft_gate", timeout_s=30),
        _spec("loss_went_down", "sft_gate", timeout_s=30),
    ]),
    "merge": ("gate2_merge", [
        _spec("merged_model_loads", "merge_gate", mode="parallel", timeout_s=600, needs_model=True),
        _spec("size_ok", "merge_gate", mode="parallel", timeout_s=60),
        _spec("tokenizer_ok", "merge_gate", mode="parallel", timeout_s=60),
        _spec("merge_equivalence", "merge_gate", timeout_s=1800, needs_model=True),
    ]),
    "dpo": ("gate3_dpo", [
        _spec("alignment_ok", "dpo_gate", mode="parallel", timeout_s=30),
        _spec("dpo_step0_sanity", "dpo_gate", mode="parallel", timeout_s=30),
        _spec("output_format_valid", "generation", timeout_s=1800, needs_model=True),
        _spec("no_harmful_content", "generation", timeout_s=1800, needs_model=True),
    ]),
}

# Built-ins that `validation.custom_checks` may name, to add them to a gate that lacks them.
NAMED_BUILTINS = {spec.name: spec for spec in GATES["dpo"][1] if spec.needs_model}

# Defaults for a user's `package.module:function` check; `validation.checks.<name>` overrides them.
CUSTOM_DEFAULTS = dict(mode="sequential", timeout_s=300.0, severity="error", needs_model=True)

CHECK_NAMES = tuple(spec.name for _gate, specs in GATES.values() for spec in specs)


def final_gate_stage(config: PipelineConfig) -> str | None:
    """Custom checks run at the gate of the last enabled stage: they judge the finished model."""
    enabled = [s.name for s in config.stages if s.enabled and s.name in GATES]
    return enabled[-1] if enabled else None


def specs_for(stage: str, config: PipelineConfig) -> list[CheckSpec]:
    """The specs of the checks a config's gate for `stage` runs: the table's, less `no_nan` when it is
    switched off, plus `validation.custom_checks` at the final gate, safety last. Names only, nothing
    imported."""
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
