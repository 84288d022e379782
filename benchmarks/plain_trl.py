"""The baseline for overhead.py and real_size.py: the same SFT -> merge -> DPO as trainpipe runs, as
one plain script with transformers + peft + trl and nothing else (no ledger, no child processes, no
gates, no checkpoint manifests).

It takes the config trainpipe resolves (the same file and the same `--set` overrides, so the same
base model, data, every stage key, dtype, seed and checkpoint interval) and does that work. A setting
it cannot reproduce the same way (QLoRA, a torchrun launcher, the unsloth backend, a tracker, a Hub
upload, DPO on an unmerged SFT adapter) is refused with a message and exit 2, rather than silently
timing different work.

    python benchmarks/plain_trl.py OUT_DIR [--config PATH] [KEY=VALUE ...]

It writes OUT_DIR/{sft,dpo}/checkpoint-N (the trainers' own checkpoints, trainer_state.json
included), OUT_DIR/merged, and prints one JSON line: seconds per phase and the trainers' runtimes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def refusals(config: Any) -> list[str]:
    """Settings of the resolved config this script would not reproduce faithfully, one line each."""
    import importlib.util

    from trainpipe.engine.identity import cuda_device_visible

    problems = []
    for stage in ("sft", "dpo"):
        if not config.enabled(stage):
            continue
        settings = getattr(config, stage)
        if settings.load_in_4bit:
            problems.append(f"{stage}.load_in_4bit: QLoRA is not reproduced by the plain script")
        if settings.launcher is not None:
            problems.append(f"{stage}.launcher: torchrun/DDP is not reproduced by the plain script")
        if [t for t in settings.report_to if t != "none"]:
            problems.append(f"{stage}.report_to: trackers add their own cost; the plain script logs to none")
    unsloth = config.backend == "unsloth" or (config.backend == "auto" and cuda_device_visible()
                                               and importlib.util.find_spec("unsloth") is not None)
    if unsloth:
        problems.append(f"backend: '{config.backend}' resolves to unsloth here; the plain script is transformers+peft+trl")
    if config.upload_to_hub:
        problems.append("upload_to_hub: the plain script does not push")
    if config.enabled("sft") and config.enabled("dpo") and not config.enabled("merge"):
        problems.append("stages.merge.enabled=false with SFT and DPO: DPO on the unmerged SFT adapter is not "
                        "reproduced by the plain script")
    return problems


def datasets_for(config: Any, stage: str) -> Any:
    """The training dataset, built by trainpipe's own data preparation, exactly as its stages build it
    (stages/sft.py, stages/dpo.py): the one place to follow when that preparation changes."""
    from trainpipe.stages.data import training_dataset

    if stage == "sft":
        return training_dataset(config, "sft", completion_only=config.sft.completion_only_loss)
    return training_dataset(config, "preference")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=str(QUICKSTART), help="the pipeline YAML trainpipe runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the `--set` overrides trainpipe gets")
    args = parser.parse_intermixed_args(argv)

    started = time.perf_counter()
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trainpipe.config import load_config
    from trainpipe.errors import TrainpipeError
    from trainpipe.stages.loading import resolve_model
    from trainpipe.stages.training import patch_trl_for_cpu

    if os.environ.get("PLAIN_GC_FREEZE") == "1":
        # What trainpipe's pre-imported worker does before forking a stage (attempt/zygote.py): with the
        # imported objects frozen, the training loop's collections stop walking them. Off by default:
        # a plain script does not do this; overhead.py --gc-freeze-baseline times it for equal footing.
        import gc

        gc.freeze()
    marks: dict[str, float] = {"imports": time.perf_counter() - started}
    try:
        config = load_config(args.config, overrides=args.overrides)
    except TrainpipeError as exc:
        print(f"plain_trl.py: {exc.message}", file=sys.stderr)
        return 2
    problems = refusals(config)
    if problems:
        print("plain_trl.py cannot do the same work as trainpipe for this config, so it refuses rather than "
              "time different work:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    # trl 1.15 has no CPU loss without Triton; trainpipe's stages apply the same shim (a no-op on trl 1.16+).
    patch_trl_for_cpu()
    base = resolve_model(config.base_model)
    cuda = torch.cuda.is_available()
    # As trainpipe loads for training (stages/loading.py: compute_dtype) and merges (always float32).
    train_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    load = dict(dtype=train_dtype, use_safetensors=True, trust_remote_code=config.trust_remote_code)
    full = dict(load, dtype=torch.float32)
    out = Path(args.out_dir)

    def common(settings: Any, stage: str) -> dict[str, Any]:
        # Every key trainpipe's stages/training.py: trainer_kwargs sets, from the same settings.
        return dict(output_dir=str(out / stage), num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1,
                    per_device_train_batch_size=settings.batch_size,
                    gradient_accumulation_steps=settings.gradient_accumulation,
                    learning_rate=settings.learning_rate,
                    warmup_steps=min(settings.warmup_ratio, 0.999) if settings.warmup_ratio else 0,
                    lr_scheduler_type=settings.lr_scheduler_type, weight_decay=settings.weight_decay,
                    max_grad_norm=settings.max_grad_norm, logging_steps=settings.logging_steps,
                    logging_nan_inf_filter=False, save_strategy="steps", save_steps=config.checkpoint_interval(stage),
                    seed=config.seed, data_seed=config.seed, report_to="none", use_cpu=not cuda,
                    # trl's configs default to bf16=True, which on a CPU with bf16 support trains under bf16
                    # autocast: another computation. trainpipe decides by the device, as here.
                    bf16=cuda and torch.cuda.is_bf16_supported(), fp16=cuda and not torch.cuda.is_bf16_supported(),
                    max_length=settings.max_seq_length, gradient_checkpointing=cuda, disable_tqdm=True,
                    dataloader_num_workers=0)

    def lora(settings: Any) -> LoraConfig:
        return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:  # as stages/loading.py: load_tokenizer
        tokenizer.pad_token = tokenizer.eos_token
    runtimes: dict[str, float] = {}
    steps: dict[str, int] = {}
    policy = base
    if config.enabled("sft"):
        sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base, **load),
                         args=SFTConfig(**common(config.sft, "sft"), packing=False,
                                        completion_only_loss=config.sft.completion_only_loss),
                         processing_class=tokenizer, train_dataset=datasets_for(config, "sft"),
                         peft_config=lora(config.sft))
        runtimes["sft"] = sft.train().metrics["train_runtime"]
        steps["sft"] = sft.state.global_step
        sft.model.save_pretrained(out / "sft-adapter")
        tokenizer.save_pretrained(out / "sft-adapter")
        del sft
        marks["sft"] = time.perf_counter() - started - sum(marks.values())
    if config.enabled("merge") and config.enabled("sft"):
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **full),
                                           out / "sft-adapter").merge_and_unload()
        merged = merged.to(getattr(torch, config.merge.dtype))
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        policy = str(out / "merged")
        del merged
        marks["merge"] = time.perf_counter() - started - sum(marks.values())
    if config.enabled("dpo"):
        # As stages/dpo.py: held-out preference pairs, when the config has them, are evaluated once after
        # the last step (gate 3's alignment figures); that is part of the stage's work.
        from transformers import TrainerCallback

        from trainpipe.stages.data import has_preference_eval, heldout_dataset

        heldout = heldout_dataset(config, "preference") if has_preference_eval(config) else None

        class EvaluateAtEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if heldout is not None and state.global_step == state.max_steps:
                    control.should_evaluate = True

        dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy, **load),
                         args=DPOConfig(**common(config.dpo, "dpo"), beta=config.dpo.beta), processing_class=tokenizer,
                         train_dataset=datasets_for(config, "preference"), eval_dataset=heldout,
                         peft_config=lora(config.dpo), callbacks=[EvaluateAtEnd()])
        runtimes["dpo"] = dpo.train().metrics["train_runtime"]
        steps["dpo"] = dpo.state.global_step
        dpo.model.save_pretrained(out / "dpo-adapter")
        tokenizer.save_pretrained(out / "dpo-adapter")
        del dpo
        if config.dpo.save_merged:
            merged_dpo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy, **full),
                                                   out / "dpo-adapter").merge_and_unload()
            merged_dpo.save_pretrained(out / "dpo-merged")
            tokenizer.save_pretrained(out / "dpo-merged")
        marks["dpo"] = time.perf_counter() - started - sum(marks.values())
    # One JSON line for overhead.py's phase table: seconds per phase of this script.
    print(json.dumps({"plain_phases": {k: round(v, 2) for k, v in marks.items()}, "train_runtime": runtimes,
                      "global_steps": steps, "base_model": base}))
    print(f"plain TRL pipeline done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
