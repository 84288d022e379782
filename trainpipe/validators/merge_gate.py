"""Gate 2, after the merge: the merged model loads, computes what base + adapter computed, has the
size its parameter count and dtype imply, and carries a tokenizer with a chat template."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainpipe.validators.gate import GateContext, Outcome

if TYPE_CHECKING:
    from trainpipe.config import PipelineConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Relative to the largest |logit|: float32 agrees to rounding; half precisions lose 3-4 digits.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
SAMPLE_CONVERSATION = [{"role": "user", "content": "hello"}]


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


def _equivalence_prompts(config: PipelineConfig) -> list[list[dict[str, str]]]:
    from trainpipe.stages.data import eval_rows, first_rows, split_prompt_completion

    rows = eval_rows(config) or (first_rows(config.datasets.sft, "sft", config.validation.merge_prompts)
                                 if config.datasets.sft else [])
    prompts = []
    for row in rows[:config.validation.merge_prompts]:
        if "messages" in row:
            prompts.append(split_prompt_completion(row["messages"])["prompt"])
        elif isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
    return prompts or [SAMPLE_CONVERSATION]


def _logits(model: Any, tokenizer: Any, conversation: list[dict[str, str]]) -> Any:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return model(**{k: v.to(model.device) for k, v in ids.items()}).logits.float()


def reference_logits(model: Any, tokenizer: Any, config: PipelineConfig) -> list[Any]:
    """Logits of base + adapter, unmerged and in float32, on the equivalence prompts (on CPU).

    The merge stage computes them from the model it has just loaded, right before merging it, and
    hands them to its gate in memory (`GateContext.from_stage`): the very reference the check would
    otherwise load a second model for. The merged model is still the one read back from disk."""
    import torch

    with torch.no_grad():
        return [_logits(model, tokenizer, conversation).cpu() for conversation in _equivalence_prompts(config)]


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
    prompts = _equivalence_prompts(ctx.config)
    worst = 0.0
    worst_prompt = 0
    with torch.no_grad():
        for index, (conversation, want) in enumerate(zip(prompts, reference, strict=True)):
            got = _logits(merged, tokenizer, conversation).to(want.device)
            relative = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
            if not relative <= worst:
                worst, worst_prompt = relative, index
    passed = worst <= tolerance
    details = (f"{len(prompts)} prompts, merged stored as {dtype}; worst on prompt {worst_prompt}; "
               f"reference (base + adapter) {source}")
    if not passed:
        details += "; the merged weights do not match base + adapter (modified after the merge, or wrong base?)"
    return Outcome(passed, value=worst, threshold=f"<= {tolerance:g} (relative)", details=details)
