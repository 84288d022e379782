"""The baseline for overhead.py: the same SFT -> merge -> DPO on the same data and settings as
configs/quickstart.yaml, as one plain script with transformers + peft + trl and nothing else
(no ledger, no child processes, no gates, no checkpoint manifests). Extra arguments are
`--set`-style overrides of configs/quickstart.yaml, so that both sides do the same work."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(out_dir: str, overrides: list[str]) -> None:
    started = time.perf_counter()
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trainpipe.config import load_config
    from trainpipe.stages.data import training_dataset
    from trainpipe.stages.tiny_model import ensure_tiny_model

    if os.environ.get("PLAIN_GC_FREEZE") == "1":
        # What trainpipe's pre-imported worker does before forking a stage (stages/zygote.py): with the
        # imported objects frozen, the training loop's collections stop walking them. Off by default:
        # a plain script does not do this; overhead.py --gc-freeze-baseline times it for equal footing.
        import gc

        gc.freeze()
    marks = {"imports": time.perf_counter() - started}
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "configs" / "quickstart.yaml", overrides=overrides)
    base = str(ensure_tiny_model())
    out = Path(out_dir)

    def common(settings, name):
        return dict(output_dir=str(out / name), num_train_epochs=settings.epochs,
                    per_device_train_batch_size=settings.batch_size,
                    gradient_accumulation_steps=settings.gradient_accumulation,
                    learning_rate=settings.learning_rate, warmup_steps=settings.warmup_ratio or 0,
                    logging_steps=1, save_steps=config.checkpoint_every_n_steps, seed=config.seed,
                    report_to="none", use_cpu=True, max_length=settings.max_seq_length,
                    gradient_checkpointing=False, disable_tqdm=True,
                    # As trainpipe on a CPU (stages/training.py: trainer_kwargs): float32, not mixed
                    # precision. trl's configs default to bf16=True, which on a CPU with bf16 support
                    # trains under bf16 autocast: another computation, ~35% slower on this tiny model.
                    bf16=False, fp16=False, data_seed=config.seed)

    def lora(settings):
        return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=list(settings.target_modules), task_type="CAUSAL_LM")

    tokenizer = AutoTokenizer.from_pretrained(base)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                     args=SFTConfig(**common(config.sft, "sft"), completion_only_loss=config.sft.completion_only_loss),
                     processing_class=tokenizer,
                     train_dataset=training_dataset(config, "sft", completion_only=config.sft.completion_only_loss),
                     peft_config=lora(config.sft))
    runtimes = {"sft": sft.train().metrics["train_runtime"]}
    sft.model.save_pretrained(out / "sft-adapter")
    marks["sft"] = time.perf_counter() - started - sum(marks.values())

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       out / "sft-adapter").merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    marks["merge"] = time.perf_counter() - started - sum(marks.values())

    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32),
                     args=DPOConfig(**common(config.dpo, "dpo"), beta=config.dpo.beta), processing_class=tokenizer,
                     train_dataset=training_dataset(config, "preference"),
                     peft_config=lora(config.dpo))
    runtimes["dpo"] = dpo.train().metrics["train_runtime"]
    dpo.model.save_pretrained(out / "dpo-adapter")
    merged_dpo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "merged"),
                                           out / "dpo-adapter").merge_and_unload()
    merged_dpo.save_pretrained(out / "dpo-merged")
    marks["dpo"] = time.perf_counter() - started - sum(marks.values())
    # One JSON line for overhead.py's phase table: seconds per phase of this script.
    print(json.dumps({"plain_phases": {k: round(v, 2) for k, v in marks.items()}, "train_runtime": runtimes}))
    print(f"plain TRL pipeline done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    # plain_trl.py OUT_DIR [KEY=VALUE ...]: the same `--set` overrides the trainpipe side gets
    main(sys.argv[1], sys.argv[2:])
