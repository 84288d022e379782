"""Gate 2, after the merge: the merged model loads, computes what base + adapter computed, has the
size its parameter count and dtype imply, and carries a tokenizer with a chat template."""

from __future__ import annotations

import math
from pathlib import Path

from trainpipe.stages.equivalence import SAMPLE_CONVERSATION, equivalence_prompts, logits_for, reference_logits
from trainpipe.validators.gate import GateContext, Outcome

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Relative to the largest |logit|: float32 agrees to rounding; half precisions lose 3-4 digits.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def merged_model_loads(ctx: GateContext) -> Outcome:
    model, _tokenizer = ctx.resources.model()
    count = sum(p.numel() for p in model.parameters())
    return Outcome(count > 0, value=count, threshold=">0 parameters", details=type(model).__name__)


def size_ok(ctx: GateContext) -> Outcome:
    from safetensors import safe_open

    root = Path(ctx.output_path or "")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return Outcome(False, details=f"no .safetensors files in {root}")
    count = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                count += math.prod(handle.get_slice(key).get_shape())
    dtype = ctx.config.merge.dtype
    expected = count * DTYPE_BYTES[dtype]
    actual = sum(p.stat().st_size for p in files)
    ratio = actual / expected if expected else float("inf")
    return Outcome(0.9 <= ratio <= 1.1, value=actual, threshold=f"{expected} ± 10%",
                   details=f"{count} parameters x {DTYPE_BYTES[dtype]} bytes ({dtype}); on disk {ratio:.3f}x that")


def tokenizer_ok(ctx: GateContext) -> Outcome:
    from trainpipe.stages.loading import load_tokenizer

    tokenizer = load_tokenizer(str(ctx.output_path), ctx.config)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return Outcome(False, value=False, threshold="chat template present",
                       details="the tokenizer has no chat_template; save it with the merged model")
    rendered = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    return Outcome(bool(rendered), value=True, threshold="chat template present",
                   details=f"vocab {len(tokenizer)}, template renders {len(rendered)} chars")


def merge_equivalence(ctx: GateContext) -> Outcome:
    """Logits of merged vs base + adapter (unmerged, float32) on fixed prompts."""
    import torch

    merged, tokenizer = ctx.resources.model()
    reference = ctx.from_stage.get("merge_reference_logits")
    source = "computed by the merge stage before merging"
    if reference is None:  # a gate run without its stage's memory: load the reference itself
        from peft import PeftModel

        from trainpipe.stages.loading import load_causal_lm, resolve_model

        base = load_causal_lm(resolve_model(ctx.inputs["base_model"]), ctx.config, full_precision=True,
                              dtype=torch.float32)
        reference = reference_logits(PeftModel.from_pretrained(base, ctx.inputs["sft_adapter"]).eval(), tokenizer,
                                     ctx.config)
        source = "loaded by the gate"
    dtype = ctx.config.merge.dtype
    tolerance = ctx.config.validation.merge_tolerance or DEFAULT_TOLERANCE[dtype]
    prompts = equivalence_prompts(ctx.config)
    worst = 0.0
    worst_prompt = 0
    with torch.no_grad():
        for index, (conversation, want) in enumerate(zip(prompts, reference, strict=True)):
            got = logits_for(merged, tokenizer, conversation).to(want.device)
            relative = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
            if not relative <= worst:
                worst, worst_prompt = relative, index
    passed = worst <= tolerance
    details = (f"{len(prompts)} prompts, merged stored as {dtype}; worst on prompt {worst_prompt}; "
               f"reference (base + adapter) {source}")
    if not passed:
        details += "; the merged weights do not match base + adapter (modified after the merge, or wrong base?)"
    return Outcome(passed, value=worst, threshold=f"<= {tolerance:g} (relative)", details=details)
