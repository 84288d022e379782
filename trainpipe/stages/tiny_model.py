"""The built-in tiny model: a Qwen2-architecture causal LM of ~100k parameters and a byte-level BPE
tokenizer trained on the bundled Task API data. Built offline and deterministically, then cached,
so the whole pipeline runs for real on a CPU without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from trainpipe.paths import bundled_path, cache_dir

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-qwen2"
# Bump when anything below changes what gets built, so stale caches are not reused.
RECIPE_VERSION = "3"
# A short full-parameter pretraining on the raw strings of the corpus (requests and JSON actions,
# each on its own) and on chat transcripts that stop where the assistant's reply would begin, so
# the base knows the vocabulary and the chat format but not the request -> action mapping that SFT
# teaches. Single-threaded so the weights are the same on every machine.
PRETRAIN = dict(steps=300, batch_size=32, seq_len=64, learning_rate=3e-3)

VOCAB_SIZE = 1024
ARCH = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The ChatML template Qwen2 models use; `generation` markers let TRL mask everything but the reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def _corpus() -> list[str]:
    texts: list[str] = []
    data_dir = bundled_path("examples/task_api")
    for name in ("sft.jsonl", "preference.jsonl"):
        for line in (data_dir / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for message in row.get("messages", []):
                texts.append(message["content"])
            if row.get("messages"):
                prompt = [m for m in row["messages"] if m["role"] != "assistant"]
                texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt)
                             + "<|im_start|>assistant\n")
            for key in ("prompt", "chosen", "rejected"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
    return texts


def _fingerprint(texts: list[str]) -> str:
    digest = hashlib.sha256(RECIPE_VERSION.encode())
    digest.update(json.dumps([ARCH, PRETRAIN], sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()[:12]


def _build_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=ARCH["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _build_model(vocab_size: int, eos_id: int, pad_id: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None,
                         torch_dtype="float32", **ARCH)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    try:
        unique = sorted(set(texts))
        encoded = [tokenizer(t + tokenizer.eos_token)["input_ids"][: PRETRAIN["seq_len"]] for t in unique]
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["learning_rate"])
        model.train()
        for _ in range(PRETRAIN["steps"]):
            picks = torch.randint(len(encoded), (PRETRAIN["batch_size"],), generator=generator).tolist()
            width = max(len(encoded[i]) for i in picks)
            ids = torch.full((len(picks), width), tokenizer.pad_token_id)
            labels = torch.full((len(picks), width), -100)
            for row, i in enumerate(picks):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                labels[row, : len(encoded[i])] = torch.tensor(encoded[i])
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def tiny_model_dir(name: str = BUILTIN_PREFIX + TINY_NAME) -> Path:
    """Where the built model lives (built or not); ConfigError for an unknown built-in name."""
    short = name.removeprefix(BUILTIN_PREFIX)
    if short != TINY_NAME:
        from trainpipe.errors import ConfigError

        raise ConfigError(f"unknown built-in model '{name}'; the one built-in is '{BUILTIN_PREFIX}{TINY_NAME}'")
    return cache_dir() / "models" / f"{TINY_NAME}-{_fingerprint(_corpus())}"


def ensure_tiny_model(name: str = BUILTIN_PREFIX + TINY_NAME) -> Path:
    """Path to the built model directory, building it on first use (about a second)."""
    target = tiny_model_dir(name)
    if (target / "model.safetensors").is_file():
        return target
    texts = _corpus()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so a killed build never leaves a half model that looks cached.
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
    try:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _build_tokenizer(texts, staging)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(staging)
        model = _build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        _pretrain(model, tokenizer, texts)
        model.save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
