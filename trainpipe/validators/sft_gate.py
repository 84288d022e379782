"""Gate 1, after SFT: the adapter exists and loads, the loss is under max_loss, went down, and no
logged loss or grad norm is NaN/inf."""

from __future__ import annotations

import math
from pathlib import Path

from trainpipe.validators.gate import GateContext, Outcome

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files_exist(ctx: GateContext) -> Outcome:
    root = Path(ctx.output_path or "")
    missing = [name for name in ADAPTER_FILES if not (root / name).is_file()]
    return Outcome(not missing, value=len(ADAPTER_FILES) - len(missing), threshold=len(ADAPTER_FILES),
                   details=f"missing: {', '.join(missing)}" if missing else str(root))


def adapter_loads(ctx: GateContext) -> Outcome:
    """Load base + adapter the way the merge will, and require every LoRA weight to be finite."""
    import torch
    from peft import PeftModel

    from trainpipe.stages.loading import load_causal_lm, resolve_model

    base = load_causal_lm(resolve_model(ctx.inputs["base_model"]), ctx.config, full_precision=True,
                          dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ctx.output_path))
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if not lora:
        return Outcome(False, value=0, threshold=">0", details="the adapter put no LoRA weights into the model")
    bad = [name for name, p in lora.items() if not torch.isfinite(p).all()]
    trained = sum(1 for name, p in lora.items() if "lora_B" in name and p.abs().max() > 0)
    details = f"{len(lora)} LoRA tensors, {trained} lora_B tensors moved from zero"
    if bad:
        details = f"non-finite values in {len(bad)} LoRA tensors, first {bad[0]}"
    return Outcome(not bad, value=len(lora), threshold=">0 finite LoRA tensors", details=details)


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
    details = "" if not bad else (f"non-finite {bad[0][1]} at step {bad[0][0]} ({len(bad)} values in all); "
                                  "lower learning_rate or max_grad_norm")
    return Outcome(not bad, value=len(bad), threshold=0, details=details)


def first_and_last_window(values: list[float], share: float) -> tuple[float, float, int] | None:
    """Means of the first and last `share` of the values; None with fewer than two values."""
    if len(values) < 2:
        return None
    width = max(1, min(len(values) // 2, round(len(values) * share)))
    return sum(values[:width]) / width, sum(values[-width:]) / width, width


def loss_went_down(ctx: GateContext) -> Outcome:
    losses = [value for _step, value in ctx.logged("loss")]
    windows = first_and_last_window(losses, ctx.config.validation.loss_window)
    if windows is None:
        return Outcome(False, value=None, threshold=None,
                       details=f"{len(losses)} loss values logged; need 2 or more (lower logging_steps)")
    first, last, width = windows
    passed = math.isfinite(last) and last < first
    return Outcome(passed, value=round(last, 6), threshold=f"< {first:.6g}",
                   details=f"mean of the last {width} logged losses vs the first {width}"
                           + ("" if passed else "; the model did not learn: raise learning_rate or train longer"))
