"""Gate 1, after SFT: the adapter exists, the loss is under max_loss, and no logged value is NaN/inf."""

from __future__ import annotations

import math
from pathlib import Path

from trainpipe.validators.gate import Check, GateContext, Outcome

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files_exist(ctx: GateContext) -> Outcome:
    root = Path(ctx.output_path or "")
    missing = [name for name in ADAPTER_FILES if not (root / name).is_file()]
    return Outcome(not missing, value=len(ADAPTER_FILES) - len(missing), threshold=len(ADAPTER_FILES),
                   details=f"missing: {', '.join(missing)}" if missing else str(root))


def loss_below_max(ctx: GateContext) -> Outcome:
    loss = ctx.metrics.get("final_loss")
    limit = ctx.config.validation.max_loss
    if loss is None or not math.isfinite(float(loss)):
        return Outcome(False, value=loss, threshold=limit, details="no finite final loss was logged")
    return Outcome(float(loss) < limit, value=round(float(loss), 6), threshold=limit,
                   details="" if float(loss) < limit else "raise max_loss, train longer, or tune learning_rate")


def no_nan(ctx: GateContext) -> Outcome:
    bad = [(entry.get("step"), key) for entry in ctx.log_history for key in ("loss", "grad_norm")
           if key in entry and not math.isfinite(float(entry[key]))]
    details = "" if not bad else f"non-finite {bad[0][1]} at step {bad[0][0]} ({len(bad)} values in all)"
    return Outcome(not bad, value=len(bad), threshold=0, details=details)


def checks(ctx: GateContext) -> list[Check]:
    found = [Check("adapter_files_exist", adapter_files_exist, mode="parallel", timeout_s=30),
             Check("loss_below_max", loss_below_max, mode="sequential", timeout_s=30)]
    if ctx.config.validation.check_nan:
        found.append(Check("no_nan", no_nan, mode="sequential", timeout_s=30))
    return found
