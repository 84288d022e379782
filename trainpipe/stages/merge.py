"""Merge: fold the SFT adapter into a full-precision copy of the base, never into 4-bit weights."""

from __future__ import annotations

import time

from trainpipe.stages.base import StageContext, StageResult
from trainpipe.stages.loading import dir_size_bytes, load_causal_lm, load_tokenizer, resolve_model
from trainpipe.stages.training import finalize_output, staging_dir, write_stage_record
from trainpipe.stages.equivalence import reference_logits


def run(ctx: StageContext) -> StageResult:
    import torch
    from peft import PeftModel

    settings = ctx.settings()
    base = resolve_model(ctx.spec.inputs["base_model"])
    adapter = ctx.spec.inputs["sft_adapter"]
    started = time.perf_counter()
    # A base loaded in 4-bit for QLoRA is re-read here in float32 (dequantized if stored quantized).
    model = load_causal_lm(base, ctx.config, full_precision=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    tokenizer = load_tokenizer(adapter, ctx.config)
    # Gate 2's reference, from the model in hand: it then loads only the merged output, not a second model.
    reference_started = time.perf_counter()
    ctx.for_gate["merge_reference_logits"] = reference_logits(model, tokenizer, ctx.config)
    reference_seconds = time.perf_counter() - reference_started
    model = model.merge_and_unload()
    model = model.to(getattr(torch, settings.dtype))

    staging = staging_dir(ctx)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    merge_seconds = time.perf_counter() - started - reference_seconds
    metrics = {
        "base_model": base,
        "adapter_path": adapter,
        "merged_path": str(ctx.output_dir),
        "size_gb": dir_size_bytes(staging) / 1e9,
        "merge_time_seconds": merge_seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": settings.dtype,
    }
    write_stage_record(staging, metrics)
    final = finalize_output(ctx, staging)
    return StageResult(output_path=str(final), metrics=metrics, final_model_path=str(final))
