"""benchmarks/plain_trl.py does the work trainpipe does for the same resolved config: a non-default
base model and max_steps reach both sides, read back from the trainers' own checkpoint states and
the saved models; what the script cannot reproduce, it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO_ROOT
from helpers import cli

# A random model learns nothing in a few steps: the gates still run, their learning checks as warnings.
LOOSE_GATES = ["validation.max_loss=50", "validation.min_accuracy=0", "validation.max_new_tokens=8",
               "validation.checks.output_format_valid.severity=warn", "validation.checks.loss_went_down.severity=warn"]


# Two whole pipelines (trainpipe and the plain script) on a 3-layer model: ~60 s on 2 cores, so it
# runs in `make matrix`, beside the other extended scenarios.
pytestmark = pytest.mark.extended

def _random_model(directory: Path) -> Path:
    """The tiny model's config with one more layer and random weights, saved as safetensors beside its
    tokenizer: a base model that is neither the default nor the same shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainpipe.stages.tiny_model import ASSET_DIR

    config = AutoConfig.from_pretrained(ASSET_DIR)
    config.num_hidden_layers = 3
    config.layer_types = ["full_attention"] * 3
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSET_DIR / name, directory / name)
    return directory


def _trainer_state(checkpoints: Path) -> dict:
    newest = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return json.loads((newest / "trainer_state.json").read_text())


def _layers(model_dir: Path) -> tuple[int, int]:
    """(num_hidden_layers from config.json, tensors in the weights): what model was saved."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        tensors = len(list(handle.keys()))
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"], tensors


def test_baseline_trains_the_same_model_for_the_same_steps(tmp_path, db_url):
    base = _random_model(tmp_path / "random-3-layer")
    sets = [f"base_model={base}", "sft.max_steps=4", "dpo.max_steps=3", "checkpoint_every_n_steps=2", *LOOSE_GATES]

    proc = cli("run", str(QUICKSTART), *[a for s in [f"output_dir={tmp_path / 'tp'}", *sets] for a in ("--set", s)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = next((tmp_path / "tp").glob("quickstart-*"))
    plain = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "plain_trl.py"), str(tmp_path / "plain"),
                            *sets], capture_output=True, text=True, cwd=REPO_ROOT)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]

    for stage, steps in (("sft", 4), ("dpo", 3)):
        ours = _trainer_state(run_dir / ".work" / stage / "checkpoints")
        theirs = _trainer_state(tmp_path / "plain" / stage)
        assert ours["global_step"] == theirs["global_step"] == steps, (stage, ours["global_step"], theirs["global_step"])
        assert ours["max_steps"] == theirs["max_steps"] == steps
        assert ours["train_batch_size"] == theirs["train_batch_size"]
    # The same base model: the SFT adapters say what they were trained on, the merged copies what they are.
    adapter = json.loads((run_dir / "sft" / "adapter_config.json").read_text())
    baseline_adapter = json.loads((tmp_path / "plain" / "sft-adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == baseline_adapter["base_model_name_or_path"] == str(base)
    assert _layers(run_dir / "merged") == _layers(tmp_path / "plain" / "merged") == _layers(base)
    assert _layers(base)[0] == 3  # not the built-in two-layer model


def test_baseline_refuses_what_it_cannot_reproduce(tmp_path):
    plain = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "plain_trl.py"), str(tmp_path / "plain"),
                            "sft.load_in_4bit=true", "stages.merge.enabled=false"],
                           capture_output=True, text=True, cwd=REPO_ROOT)
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert "sft.load_in_4bit" in plain.stderr and "stages.merge.enabled=false" in plain.stderr, plain.stderr
    assert not (tmp_path / "plain").exists()
