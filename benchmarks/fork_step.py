"""Is a training step slower in a child forked from the pre-imported stage worker than in a fresh
interpreter? (attempt/zygote.py forks each stage attempt from a process that imported torch,
transformers, trl and peft once.)

Each side runs the same 6 LoRA steps (AdamW, batch 4 x 128 tokens) on a 6-layer Qwen2 of the
Qwen2.5-0.5B width (hidden 896, random weights), in its own process, and prints its step times:
- fresh: a new interpreter imports everything and trains;
- fork: `trainpipe.attempt.zygote.preload()`, then os.fork(); the child trains (what a stage does).
The sides alternate `--rounds` times; compare the medians of steps 2-6 (step 1 warms up).

    python benchmarks/fork_step.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_steps(mode: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=6, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True)
    model = get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (4, 128))
    times = []
    for _ in range(6):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    print(json.dumps({"mode": mode, "threads": torch.get_num_threads(), "steps": times}), flush=True)


def child(mode: str) -> None:
    if mode == "fresh":
        train_steps(mode)
        return
    sys.path.insert(0, str(ROOT))
    from trainpipe.attempt.zygote import preload

    preload()
    pid = os.fork()
    if pid == 0:
        try:
            train_steps(mode)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["fresh", "fork"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    medians: dict[str, list[float]] = {"fresh": [], "fork": []}
    for round_no in range(args.rounds):
        for mode in medians:
            out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True,
                                 check=True).stdout
            report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
            medians[mode].append(statistics.median(report["steps"][1:]))
            print(f"round {round_no + 1} {mode}: threads {report['threads']}, steps "
                  + ", ".join(f"{t:.3f}" for t in report["steps"]) + f" s; median of 2-6 {medians[mode][-1]:.3f} s",
                  flush=True)
    fresh, fork = statistics.median(medians["fresh"]), statistics.median(medians["fork"])
    print(f"median step: fresh {fresh:.3f} s, forked {fork:.3f} s, ratio forked/fresh {fork / fresh:.3f}")


if __name__ == "__main__":
    main()
