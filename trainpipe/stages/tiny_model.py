"""The built-in tiny model: a Qwen2-architecture causal LM of ~130k parameters and a byte-level BPE
tokenizer trained on the bundled Task API data, so the whole pipeline runs for real on a CPU without
downloading anything.

The built model ships as package data in `trainpipe/assets/tiny-qwen2/`, checked against its
SHA256SUMS when it is used. Shipping it, rather than building it on first use, gives every machine the
same base weights: a build is deterministic on one CPU kernel only (AVX2, AVX-512 and the scalar
`default` kernel round differently), and a different base would shift every figure downstream.
`python -m trainpipe.stages.tiny_model --write-assets` rebuilds it (about 40 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from trainpipe.paths import bundled_path

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny-qwen2"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / TINY_NAME
CHECKSUMS = "SHA256SUMS"
# Bump when anything below changes what gets built; `--check` and the tests compare it with the
# recipe recorded in the shipped SHA256SUMS, so a stale shipped model cannot go unnoticed.
RECIPE_VERSION = "5"
# A short full-parameter pretraining, single-threaded. It teaches the vocabulary, well-formed JSON
# actions and the chat format *including that a JSON reply follows `<|im_start|>assistant`*, but pairs
# each request with the reply of another, shuffled request: the base can chat in the right shape but
# does not know which action answers which request. That mapping is what SFT teaches. (Recipe 3
# stopped its chat examples at `assistant\n` + end-of-text, so the base learned that replies are
# empty; SFT then had to overturn that for the reply's first token, and on some seeds and CPUs it did
# not, which made the quickstart's format score a coin toss across machines.)
PRETRAIN = dict(steps=300, batch_size=32, seq_len=128, learning_rate=3e-3)

VOCAB_SIZE = 1024
ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
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


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _corpus() -> tuple[list[str], list[str]]:
    """(tokenizer texts, pretraining texts). The tokenizer sees every string of the bundled data; the
    pretraining leaves out the preference file's rejected replies (malformed JSON, prose), which DPO
    is there to push away from, and sees requests with mismatched replies (see PRETRAIN)."""
    from trainpipe.stages.data import load_rows

    data_dir = bundled_path("examples/task_api")
    sft, preference = load_rows(data_dir / "sft.jsonl"), load_rows(data_dir / "preference.jsonl")
    plain = [m["content"] for row in sft for m in row["messages"]]
    plain += [row[key] for row in preference for key in ("prompt", "chosen")]
    replies = [row["messages"][-1]["content"] for row in sft]
    random.Random(0).shuffle(replies)
    mismatched = [_chatml(row["messages"][:-1]) + "<|im_start|>assistant\n" + reply
                  for row, reply in zip(sft, replies)]
    rejected = [row["rejected"] for row in preference]
    return plain + rejected + mismatched, plain + mismatched


def _fingerprint(texts: tuple[list[str], list[str]]) -> str:
    digest = hashlib.sha256(RECIPE_VERSION.encode())
    digest.update(json.dumps([ARCH, PRETRAIN, VOCAB_SIZE, CHAT_TEMPLATE], sort_keys=True).encode())
    for part in texts:
        for text in part:
            digest.update(text.encode())
    return digest.hexdigest()[:12]


def _build_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # One token per digit, as Qwen2's own tokenizer does: a reply copies the request's task id digit by
    # digit, from ten well-trained tokens, instead of needing a merged "82" token it rarely saw.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
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


def _pretrain(model, tokenizer, texts: list[str], steps: int | None = None) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    try:
        unique = sorted(set(texts))
        encoded = [tokenizer(t + tokenizer.eos_token)["input_ids"][: PRETRAIN["seq_len"]] for t in unique]
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["learning_rate"])
        model.train()
        for _ in range(PRETRAIN["steps"] if steps is None else steps):
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


def build_tiny_model(out_dir: Path, *, pretrain_steps: int | None = None) -> None:
    """Build the tokenizer and the pretrained model into `out_dir` (which must not exist yet)."""
    texts = _corpus()
    tokenizer_texts, pretraining_texts = texts
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=out_dir.parent))
    # Built aside and renamed, so a killed build never leaves a half model behind.
    try:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _build_tokenizer(tokenizer_texts, staging)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(staging)
        model = _build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        _pretrain(model, tokenizer, pretraining_texts, steps=pretrain_steps)
        model.save_pretrained(staging, safe_serialization=True)
        _write_checksums(staging, _fingerprint(texts))
        staging.chmod(0o755)  # mkdtemp makes it private; it ships as package data
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_checksums(model_dir: Path, recipe: str) -> None:
    import torch

    lines = [f"# recipe {recipe}",
             f"# built with torch {torch.__version__}, CPU kernel {torch.backends.cpu.get_cpu_capability()}"]
    lines += [f"{_file_sha256(f)}  {f.name}" for f in sorted(model_dir.iterdir()) if f.is_file() and f.name != CHECKSUMS]
    (model_dir / CHECKSUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_checksums(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(recipe fingerprint, {file name: sha256}) as recorded in the model's SHA256SUMS."""
    recipe, sums = None, {}
    for line in (model_dir / CHECKSUMS).read_text(encoding="utf-8").splitlines():
        if line.startswith("# recipe "):
            recipe = line.removeprefix("# recipe ").strip()
        elif line and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return recipe, sums


def verify_model_dir(model_dir: Path) -> None:
    """Every file listed in SHA256SUMS is present and unchanged; raises TrainpipeError naming the file."""
    from trainpipe.errors import TrainpipeError

    fix = "reinstall trainpipe, or rebuild it with `python -m trainpipe.stages.tiny_model --write-assets`"
    if not (model_dir / CHECKSUMS).is_file():
        raise TrainpipeError(f"built-in model: {model_dir / CHECKSUMS} is missing; {fix}")
    _recipe, sums = read_checksums(model_dir)
    for name, expected in sums.items():
        path = model_dir / name
        if not path.is_file():
            raise TrainpipeError(f"built-in model: {path} is missing; {fix}")
        if _file_sha256(path) != expected:
            raise TrainpipeError(f"built-in model: {path} does not match its sha256 in {CHECKSUMS}; {fix}")


_VERIFIED: set[Path] = set()


def ensure_tiny_model(name: str = BUILTIN_PREFIX + TINY_NAME) -> Path:
    """The shipped model directory, checked against its SHA256SUMS once per process."""
    short = name.removeprefix(BUILTIN_PREFIX)
    if short != TINY_NAME:
        from trainpipe.errors import ConfigError

        raise ConfigError(f"unknown built-in model '{name}'; the one built-in is '{BUILTIN_PREFIX}{TINY_NAME}'")
    if ASSET_DIR not in _VERIFIED:
        verify_model_dir(ASSET_DIR)
        _VERIFIED.add(ASSET_DIR)
    return ASSET_DIR


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainpipe.stages.tiny_model",
                                     description="Rebuild the built-in tiny model (about 40 s on 2 CPU cores).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="build into this new directory")
    target.add_argument("--write-assets", action="store_true",
                        help=f"replace the shipped model in {ASSET_DIR} (then commit it with its SHA256SUMS)")
    target.add_argument("--check", action="store_true", help="verify the shipped model against SHA256SUMS")
    args = parser.parse_args(argv)
    if args.check:
        verify_model_dir(ASSET_DIR)
        recipe, _ = read_checksums(ASSET_DIR)
        current = _fingerprint(_corpus())
        print(f"{ASSET_DIR}: files match SHA256SUMS; recipe {recipe} "
              + ("(current)" if recipe == current else f"(STALE: the code and data now give {current})"))
        return 0 if recipe == current else 1
    out = ASSET_DIR if args.write_assets else args.out
    previous = out.with_name(out.name + ".previous")
    if args.write_assets and out.exists():
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_tiny_model(out)
    except BaseException:
        if previous.exists() and not out.exists():
            previous.rename(out)  # a failed rebuild leaves the shipped model as it was
        raise
    shutil.rmtree(previous, ignore_errors=True)
    print(f"built {out}")
    print((out / CHECKSUMS).read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
