"""The file and model checks of gates 1 and 2 fail on broken outputs: no check can only pass.
(Gate 2's merge_equivalence, gate 3 and the loss checks are failed by real runs in test_gates.py
and on trainer logs in test_gate_mechanics.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART

from trainpipe.config import load_config
from trainpipe.stages.tiny_model import ensure_tiny_model
from trainpipe.validators import Check, GateContext, run_gate
from trainpipe.validators.merge_gate import merged_model_loads, size_ok, tokenizer_ok
from trainpipe.validators.resources import GateResources
from trainpipe.validators.sft_gate import adapter_files_exist, adapter_loads


@pytest.fixture
def model_copy(tmp_path) -> Path:
    target = tmp_path / "merged"
    shutil.copytree(ensure_tiny_model(), target)
    return target


def gate_context(stage: str, output: Path, overrides=()) -> GateContext:
    ctx = GateContext(stage=stage, output_path=str(output), metrics={}, log_history=[],
                      config=load_config(QUICKSTART, overrides=list(overrides)),
                      inputs={"base_model": str(ensure_tiny_model())})
    ctx.resources = GateResources(ctx)
    return ctx


def only(check_fn, ctx, needs_model=False):
    (result,) = run_gate("g", [Check(check_fn.__name__, check_fn, needs_model=needs_model)], ctx).checks
    return result


def test_model_checks_pass_on_a_good_model(model_copy):
    ctx = gate_context("merge", model_copy)
    assert only(merged_model_loads, ctx, needs_model=True).passed
    assert only(size_ok, ctx).passed
    assert only(tokenizer_ok, ctx).passed


def test_merged_model_that_does_not_load(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    result = only(merged_model_loads, gate_context("merge", model_copy), needs_model=True)
    assert not result.passed and "could not load the model to validate" in result.details


def test_size_off_by_the_dtype(model_copy):
    # Stored as float32 but declared bfloat16: twice the size the parameter count implies.
    result = only(size_ok, gate_context("merge", model_copy, ["merge.dtype=bfloat16"]))
    assert not result.passed and "on disk 2.0" in result.details


def test_tokenizer_without_chat_template(model_copy):
    (model_copy / "chat_template.jinja").unlink()
    result = only(tokenizer_ok, gate_context("merge", model_copy))
    assert not result.passed and "no chat_template" in result.details


def test_adapter_missing_and_adapter_that_does_not_load(tmp_path):
    adapter = tmp_path / "sft"
    adapter.mkdir()
    ctx = gate_context("sft", adapter)
    missing = only(adapter_files_exist, ctx)
    assert not missing.passed and "adapter_config.json" in missing.details
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    broken = only(adapter_loads, ctx)
    assert not broken.passed and broken.details.startswith("check raised")


def _real_adapter(folder: Path, peft_config) -> Path:
    """An adapter as peft saves it (adapter_config.json + adapter_model.safetensors) on the tiny model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ensure_tiny_model()), peft_config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_adapter_loads_fails_on_non_finite_lora_weights_and_on_an_adapter_without_lora(tmp_path):
    import torch
    from peft import IA3Config, LoraConfig
    from safetensors.torch import load_file, save_file

    lora = _real_adapter(tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    healthy = only(adapter_loads, gate_context("sft", lora))
    assert healthy.passed, healthy.details
    weights = load_file(lora / "adapter_model.safetensors")
    name = sorted(k for k in weights if "lora_A" in k)[0]
    weights[name] = weights[name].clone()
    weights[name][0, 0] = float("nan")
    save_file(weights, str(lora / "adapter_model.safetensors"))
    poisoned = only(adapter_loads, gate_context("sft", lora))
    assert not poisoned.passed and poisoned.details.startswith("non-finite values in 1 LoRA tensors"), poisoned.details
    weights[name][0, 0] = float("inf")
    save_file(weights, str(lora / "adapter_model.safetensors"))
    assert not only(adapter_loads, gate_context("sft", lora)).passed

    # A real adapter of another kind (IA3 scales, no lora_A/lora_B): it loads, and adds no LoRA weight.
    ia3 = _real_adapter(tmp_path / "ia3", IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    assert torch.is_tensor(next(iter(load_file(ia3 / "adapter_model.safetensors").values())))
    empty = only(adapter_loads, gate_context("sft", ia3))
    assert not empty.passed and empty.details == "the adapter put no LoRA weights into the model", empty.details
