"""DPO: a new LoRA on the merged model, with the merged model (adapter disabled) as the reference.

With merge disabled, the policy is base + SFT adapter (trained further) and the reference is the
frozen SFT policy. With SFT disabled, the policy starts from the base model.
"""

from __future__ import annotations

from trainpipe.stages.base import StageContext, StageResult
from trainpipe.stages.data import has_preference_eval, heldout_dataset, prepare_with_cache, training_dataset
from trainpipe.stages.data_cache import cached_trainer
from trainpipe.stages.loading import (
    load_causal_lm,
    load_for_lora_training,
    load_tokenizer,
    resolve_model,
    select_backend,
)
from trainpipe.stages.training import (
    callbacks,
    finalize_output,
    log_losses,
    patch_trl_for_cpu,
    staging_dir,
    train,
    trainer_kwargs,
    write_stage_record,
)

DPO_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _policy_and_reference(ctx: StageContext, settings, backend: str):
    policy_path = resolve_model(ctx.spec.inputs["policy_model"])
    sft_adapter = ctx.spec.inputs.get("policy_adapter")
    if not sft_adapter:
        model, tokenizer, peft_config = load_for_lora_training(policy_path, settings, ctx.config, backend)
        return model, None, tokenizer, peft_config, policy_path

    from peft import PeftModel

    policy = load_causal_lm(policy_path, ctx.config, load_in_4bit=settings.load_in_4bit)
    policy = PeftModel.from_pretrained(policy, sft_adapter, is_trainable=True)
    reference = PeftModel.from_pretrained(load_causal_lm(policy_path, ctx.config, load_in_4bit=settings.load_in_4bit),
                                          sft_adapter)
    if not settings.load_in_4bit:
        reference = reference.merge_and_unload()
    reference.eval()
    return policy, reference, load_tokenizer(sft_adapter, ctx.config), None, policy_path


def run(ctx: StageContext) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    settings = ctx.settings()
    backend = select_backend(ctx.config.backend)
    model, reference, tokenizer, peft_config, policy_path = _policy_and_reference(ctx, settings, backend)
    tokenization = {"max_length": settings.max_seq_length}
    dataset, train_entry = prepare_with_cache(ctx, "preference", lambda: training_dataset(ctx.config, "preference"),
                                              tokenizer, tokenization)
    entries = {"train": train_entry}
    heldout = None
    if has_preference_eval(ctx.config):
        heldout, entries["eval"] = prepare_with_cache(
            ctx, "preference_eval", lambda: heldout_dataset(ctx.config, "preference"), tokenizer, tokenization)

    patch_trl_for_cpu()
    args = DPOConfig(**trainer_kwargs(ctx, settings), beta=settings.beta)
    trainer_cls = cached_trainer(DPOTrainer, entries, ctx.events)
    trainer = trainer_cls(model=model, ref_model=reference, args=args, train_dataset=dataset, eval_dataset=heldout,
                          processing_class=tokenizer, peft_config=peft_config,
                          callbacks=callbacks(ctx, evaluate_at_end=heldout is not None))
    train(trainer, ctx)

    staging = staging_dir(ctx)
    trainer.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    history = list(trainer.state.log_history)
    losses = log_losses(history)
    last = next((entry for entry in reversed(history) if "rewards/accuracies" in entry), {})
    evaluated = next((entry for entry in reversed(history) if "eval_rewards/accuracies" in entry), {})
    metrics = {
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "total_steps": int(trainer.state.global_step),
        "beta_used": settings.beta,
        "samples": len(trainer.train_dataset),
        "policy_model": policy_path,
        "backend": backend,
        **{key: float(last[key]) for key in DPO_KEYS if key in last},
        # Reward accuracy and margin of the policy against its reference on pairs it never trained on.
        **{f"heldout_{key}": float(evaluated[f"eval_{key}"]) for key in DPO_KEYS if f"eval_{key}" in evaluated},
    }
    if heldout is not None:
        metrics["heldout_pairs"] = len(trainer.eval_dataset)
    final_model = staging
    if settings.save_merged:
        merged_dir = staging / "merged"
        _save_merged(ctx, trainer.model, policy_path, merged_dir, tokenizer)
        final_model = merged_dir
    write_stage_record(staging, metrics)
    final = finalize_output(ctx, staging)
    final_model_path = final / final_model.relative_to(staging) if final_model != staging else final
    return StageResult(output_path=str(final), metrics=metrics, log_history=history,
                       final_model_path=str(final_model_path))


def _save_merged(ctx: StageContext, trained, policy_path: str, out_dir, tokenizer) -> None:
    """Merge into a fresh full-precision copy, so a 4-bit policy never has an adapter merged into it."""
    import tempfile

    import torch
    from peft import PeftModel

    with tempfile.TemporaryDirectory(dir=ctx.work_dir) as adapter_dir:
        trained.save_pretrained(adapter_dir, safe_serialization=True)
        base = load_causal_lm(policy_path, ctx.config, full_precision=True, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
