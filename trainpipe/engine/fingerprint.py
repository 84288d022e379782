"""Stage fingerprints: what a stage's output depends on, hashed before the stage runs.

Two stages with the same fingerprint produce interchangeable outputs, so a later run can reuse an
earlier one's (engine/cache.py). A fingerprint covers:
- the stage kind and its resolved settings, minus the keys that cannot change the result
  (`IGNORED_SETTINGS`, and every timeout, retry count and output path);
- the gate settings the stage's gate reads, since a carried-over gate result must be the one this
  config would have produced;
- its inputs: the base model (id and revision, or a content hash), the upstream stage's fingerprint,
  the datasets' sha256;
- the seed, the backend and the versions of torch, transformers, trl, peft and trainpipe.

Torch-free: versions are read from package metadata, never by importing the packages, so a fully
cached run never loads torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

from trainpipe.checkpoints import sha256_file
from trainpipe import versions
from trainpipe.config import PipelineConfig
from trainpipe.engine.identity import base_model_identity, cuda_device_visible, digest, nproc_per_node
from trainpipe.engine.identity import dataset_identity as source_identity

# Settings that change when, how often or where something is logged or saved, never what is trained;
# and SFT's `beta`, which SFT accepts (the lesson's files carry it) and ignores.
IGNORED_SETTINGS = {"logging_steps", "save_steps", "report_to"}
IGNORED_BY_STAGE = {"sft": {"beta"}}
# Validation keys each gate reads (trainpipe/validators/*_gate.py). eval_split also decides which SFT
# rows are held out and not trained on, so it belongs to SFT as well.
GATE_KEYS = {
    "sft": ("max_loss", "check_nan", "loss_window", "eval_split"),
    "merge": ("merge_prompts", "merge_tolerance", "eval_split", "max_eval_rows"),
    "dpo": ("min_accuracy", "loss_window", "dpo_step0_tolerance", "check_nan", "preference_eval_split"),
}
# Read by the generation checks, which run at the gate of the last enabled stage (gate 3 normally).
FINAL_GATE_KEYS = ("custom_checks", "format_threshold", "format_required_keys", "blocklist", "max_new_tokens",
                   "eval_split", "max_eval_rows")
VERSIONED = ("torch", "transformers", "trl", "peft", "trainpipe")


def _file_hash(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path else None


def resolved_backend(config: PipelineConfig) -> str:
    """The backend `stages/loading.py: select_backend` will pick, without importing torch to ask CUDA:
    a visible NVIDIA device node stands in for `torch.cuda.is_available()`. CPU and GPU runs of one
    config differ anyway, so the device is part of the answer."""
    cuda = cuda_device_visible()
    backend = config.backend
    if backend == "auto":
        backend = "unsloth" if cuda and importlib.util.find_spec("unsloth") is not None else "hf"
    # Each CPU kernel rounds differently (docs/getting-started.md, "Same outcome on every CPU").
    kernel = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    return f"{backend}/{'cuda' if cuda else 'cpu'}/{kernel}"


def _gate_settings(config: PipelineConfig, stage: str) -> dict[str, Any]:
    from trainpipe.validators.registry import final_gate_stage
    from trainpipe.validators.registry import GATES

    validation = config.validation
    keys = set(GATE_KEYS[stage])
    checks = {spec.name for spec in GATES[stage][1]}
    final = stage == final_gate_stage(config)
    if final:
        keys |= set(FINAL_GATE_KEYS)
        checks |= set(validation.custom_checks)
    out: dict[str, Any] = {key: getattr(validation, key) for key in sorted(keys)}
    # A check's timeout only decides whether a slow check fails; its severity decides the gate.
    out["severity"] = {name: o.severity for name, o in sorted(validation.checks.items())
                       if name in checks and o.severity is not None}
    if final:
        out["eval"] = source_identity(config.datasets.eval)
        out["redteam"] = _file_hash(validation.redteam_file)
    if stage == "dpo":
        out["preference_eval"] = source_identity(config.datasets.preference_eval)
    return out


def stage_fingerprint(config: PipelineConfig, stage: str, upstream: str | None,
                      *, base_model: dict[str, Any] | None = None) -> str:
    """The stage's fingerprint. `upstream` is the fingerprint of the stage whose output this one reads
    (SFT for merge, merge or SFT for DPO), None when it reads only the base model."""
    settings = getattr(config, stage).model_dump(mode="json")
    if isinstance(settings.get("launcher"), dict) and settings["launcher"].get("nproc_per_node") == "auto":
        # World size changes the result: `auto` is fingerprinted as what it resolves to here.
        settings["launcher"] = {**settings["launcher"], "nproc_per_node": nproc_per_node(settings["launcher"])}
    datasets: dict[str, str | None] = {}
    if stage == "sft":
        datasets = {"sft": source_identity(config.datasets.sft), "eval": source_identity(config.datasets.eval)}
    elif stage == "dpo":
        datasets = {"preference": source_identity(config.datasets.preference),
                    "preference_eval": source_identity(config.datasets.preference_eval)}
    elif stage == "merge":
        datasets = {"sft": source_identity(config.datasets.sft)}  # gate 2 compares logits on SFT prompts
    return digest({
        "stage": stage,
        "settings": {k: v for k, v in settings.items()
                     if k not in IGNORED_SETTINGS | IGNORED_BY_STAGE.get(stage, set())},
        "gate": _gate_settings(config, stage),
        "base_model": base_model if base_model is not None else base_model_identity(config.base_model),
        "upstream": upstream,
        "datasets": datasets,
        "seed": config.seed,
        "trust_remote_code": config.trust_remote_code,
        "backend": resolved_backend(config),
        "versions": versions.package_versions(VERSIONED),
    })


def upstream_stage(config: PipelineConfig, stage: str) -> str | None:
    """The stage whose output `stage` reads (stage_attempt.stage_inputs), or None for the base model alone."""
    if stage == "merge":
        return "sft"
    if stage == "dpo":
        for name in ("merge", "sft"):
            if config.enabled(name):
                return name
    return None
