"""Gate 3's metric checks, after DPO. The generation checks are in generation.py."""

from __future__ import annotations

import math

from trainpipe.validators.gate import GateContext, Outcome


def _final(ctx: GateContext, key: str) -> tuple[float, int] | None:
    values = [value for _step, value in ctx.logged(key)]
    if not values:
        return None
    # One batch moves rewards/accuracies in steps of 1/batch; the last window is what "final" means.
    width = max(1, round(len(values) * ctx.config.validation.loss_window))
    return sum(values[-width:]) / width, width


def _heldout(ctx: GateContext) -> tuple[float, float] | None:
    """Reward accuracy and mean margin on the held-out pairs, from the trainer's evaluation at the
    end of DPO (stages/dpo.py), or None when no pairs were held out."""
    accuracies, margins = ctx.logged("eval_rewards/accuracies"), ctx.logged("eval_rewards/margins")
    if not accuracies or not margins:
        return None
    return accuracies[-1][1], margins[-1][1]


def alignment_ok(ctx: GateContext) -> Outcome:
    """With held-out pairs, the policy must prefer `chosen` on pairs it never trained on; without,
    the training log's last steps stand in (they reach 1.0 on memorised pairs, so say so)."""
    accuracy, margins = _final(ctx, "rewards/accuracies"), _final(ctx, "rewards/margins")
    floor = ctx.config.validation.min_accuracy
    if accuracy is None or margins is None:
        return Outcome(False, details="rewards/accuracies or rewards/margins was never logged")
    (train_acc, width), train_margin = accuracy, margins[0]
    training = f"training: rewards/accuracies {train_acc:.4g} (mean of the last {width} logged steps)"
    heldout = _heldout(ctx)
    if heldout is not None:
        acc, margin = heldout
        pairs = ctx.metrics.get("heldout_pairs")
        details = (f"held-out{f' ({pairs} pairs)' if pairs else ''}: reward accuracy {acc:.4g}, mean margin "
                   f"{margin:.4g} (must be > 0); {training}")
    else:
        acc, margin = train_acc, train_margin
        details = (f"{training}; rewards/margins {margin:.4g} (must be > 0); no held-out pairs (set "
                   "datasets.preference_eval or validation.preference_eval_split to measure unseen pairs)")
    passed = math.isfinite(acc) and math.isfinite(margin) and acc >= floor and margin > 0
    if not passed:
        details += "; train DPO longer, raise its learning_rate, or check chosen/rejected are not swapped"
    return Outcome(passed, value=round(acc, 4), threshold=f">= {floor}", details=details)


def dpo_step0_sanity(ctx: GateContext) -> Outcome:
    """Before any update the policy equals the reference, so the DPO loss is exactly ln 2."""
    losses = ctx.logged("loss")
    tolerance = ctx.config.validation.dpo_step0_tolerance
    if not losses:
        return Outcome(False, details="no DPO loss was logged")
    step, first = losses[0]
    if step > 1:
        return Outcome(False, value=first, details=f"the first loss was logged at step {step}, not step 1")
    passed = math.isfinite(first) and abs(first - math.log(2)) <= tolerance
    details = f"first logged loss {first:.4f}, ln 2 = {math.log(2):.4f}"
    if not passed:
        details += "; the reference model is not the starting policy (wrong reference or adapter?)"
    return Outcome(passed, value=round(first, 6), threshold=f"ln2 ± {tolerance}", details=details)
