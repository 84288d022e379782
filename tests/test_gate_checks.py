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
