"""SFT: LoRA (or QLoRA with load_in_4bit) on the configured target modules."""

from __future__ import annotations

from trainpipe.stages import distributed
from trainpipe.stages.base import StageContext, StageResult
from trainpipe.stages.data import prepare_with_cache, training_dataset
from trainpipe.stages.data_cache import cached_trainer
from trainpipe.stages.loading import load_for_lora_training, resolve_model, select_backend
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


def run(ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    settings = ctx.settings()
    backend = select_backend(ctx.config.backend)
    base = resolve_model(ctx.spec.inputs["base_model"])
    model, tokenizer, peft_config = load_for_lora_training(base, settings, ctx.config, backend)
    dataset, entry = prepare_with_cache(
        ctx, "sft", lambda: training_dataset(ctx.config, "sft", completion_only=settings.completion_only_loss),
        tokenizer, {"max_length": settings.max_seq_length, "completion_only_loss": settings.completion_only_loss,
                    "packing": False})

    patch_trl_for_cpu()
    args = SFTConfig(**trainer_kwargs(ctx, settings), packing=False,
                     completion_only_loss=settings.completion_only_loss)
    trainer_cls = cached_trainer(SFTTrainer, {"train": entry}, ctx.events)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=callbacks(ctx))
    outcome = train(trainer, ctx)

    staging = staging_dir(ctx)
    trainer.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    history = list(trainer.state.log_history)
    losses = log_losses(history)
    effective_batch = settings.batch_size * settings.gradient_accumulation * distributed.world_size()
    samples = len(trainer.train_dataset)
    metrics = {
        "final_loss": losses[-1] if losses else float(outcome.training_loss),
        "train_loss": float(outcome.training_loss),
        "total_steps": int(trainer.state.global_step),
        "epochs_completed": float(trainer.state.epoch or 0),
        "samples_processed": min(trainer.state.global_step * effective_batch,
                                 int(samples * (trainer.state.epoch or 0) + 0.5)),
        "samples": samples,
        "backend": backend,
        "load_in_4bit": settings.load_in_4bit,
        "base_model": base,
    }
    write_stage_record(staging, metrics)
    final = finalize_output(ctx, staging)
    return StageResult(output_path=str(final), metrics=metrics, log_history=history, final_model_path=str(final))
