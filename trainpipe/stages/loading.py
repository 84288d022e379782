"""Model and tokenizer loading for both backends.

`hf` is transformers + peft + trl. `unsloth` is FastLanguageModel; unsloth raises on import on a
machine without a GPU, so it is imported only after a CUDA check.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from trainpipe.credentials import hub_token
from trainpipe.config import PipelineConfig, StageSettings
from trainpipe.errors import ConfigError
from trainpipe.stages.tiny_model import ensure_tiny_model, is_builtin


def resolve_model(name: str) -> str:
    """A local directory for built-in models; otherwise the name as given (a path or a Hub id)."""
    return str(ensure_tiny_model(name)) if is_builtin(name) else name


def select_backend(requested: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    if requested == "unsloth":
        if not cuda:
            raise ConfigError("backend 'unsloth' needs a CUDA GPU and none is available; use backend: hf or auto")
        if importlib.util.find_spec("unsloth") is None:
            raise ConfigError("backend 'unsloth' is not installed; pip install 'trainpipe[unsloth]'")
        return "unsloth"
    if requested == "auto":
        return "unsloth" if cuda and importlib.util.find_spec("unsloth") is not None else "hf"
    return "hf"


def compute_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str, config: PipelineConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code, token=hub_token())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_prequantized(path: str, config: PipelineConfig) -> bool:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code, token=hub_token())
    except Exception:
        return False
    return getattr(model_config, "quantization_config", None) is not None


def load_causal_lm(path: str, config: PipelineConfig, *, load_in_4bit: bool = False, dtype: Any = None,
                   full_precision: bool = False):
    """Load a causal LM from safetensors only.

    `full_precision=True` is for merging: a checkpoint stored in 4-bit is dequantized, because an
    adapter must never be merged into quantized weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": config.trust_remote_code,
                              "token": hub_token()}
    if full_precision:
        kwargs["dtype"] = dtype or torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if getattr(model, "is_quantized", False) or _is_prequantized(path, config):
            model = model.dequantize()
        return model.to(dtype or torch.float32)
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype())
        kwargs["dtype"] = compute_dtype()
    else:
        kwargs["dtype"] = dtype or compute_dtype()
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # a torchrun rank's own GPU
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def lora_config(settings: StageSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def load_for_lora_training(path: str, settings: StageSettings, config: PipelineConfig, backend: str):
    """(model, tokenizer, peft_config_or_None). With unsloth the adapter is already attached."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel  # noqa: I001 - must come after the CUDA check in select_backend

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=settings.max_seq_length, load_in_4bit=settings.load_in_4bit,
            dtype=None, token=hub_token(), trust_remote_code=config.trust_remote_code)
        model = FastLanguageModel.get_peft_model(
            model, r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=list(settings.target_modules), bias="none",
            use_gradient_checkpointing="unsloth", random_state=config.seed)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, None

    model = load_causal_lm(path, config, load_in_4bit=settings.load_in_4bit)
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, load_tokenizer(path, config), lora_config(settings)


def dir_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
