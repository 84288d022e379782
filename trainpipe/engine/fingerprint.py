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

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from trainpipe.checkpoints import sha256_file
from trainpipe import versions
from trainpipe.config import PipelineConfig
from trainpipe.stages.sources import identity as source_identity

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


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_hash(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path else None


def package_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    return versions.package_versions(names)


def cuda_device_visible() -> bool:
    """A visible NVIDIA device node, standing in for `torch.cuda.is_available()` in the orchestrator,
    which never imports torch."""
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def resolved_backend(config: PipelineConfig) -> str:
    """The backend `stages/loading.py: select_backend` will pick, without importing torch to ask CUDA:
    a visible NVIDIA device node stands in for `torch.cuda.is_available()`. CPU and GPU runs of one
    config differ anyway, so the device is part of the answer."""
    cuda = cuda_device_visible()
    backend = config.backend
    if backend == "auto":
        backend = "unsloth" if cuda and importlib.util.find_spec("unsloth") is not None else "hf"
    # Each CPU kernel rounds differently (README, "Same outcome on every CPU").
    kernel = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    return f"{backend}/{'cuda' if cuda else 'cpu'}/{kernel}"


def base_model_identity(name: str) -> dict[str, Any]:
    """What identifies the base model's content: the built-in model's SHA256SUMS (its recipe and every
    file's hash), a local directory's file hashes, or a Hub id with the revision the local cache holds."""
    from trainpipe.stages.tiny_model import ASSET_DIR, CHECKSUMS, is_builtin

    if is_builtin(name):
        return {"builtin": name, "sha256sums": sha256_file(ASSET_DIR / CHECKSUMS)}
    local = Path(name).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
        return {"local": _digest([(str(p.relative_to(local)), _unchanged_file_hash(p)) for p in files])}
    return {"hub": name, "revision": _hub_revision(name)}


# (resolved path, size, mtime_ns) -> sha256. A run asks for the base model's identity more than once
# (its lineage at creation, its stages' fingerprints, a resume's environment check); a 0.5B model is
# ~1 GB to read each time. A file rewritten in place changes its mtime, so a stale hash is not reused.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _unchanged_file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def _hub_revision(repo_id: str) -> str | None:
    """The commit `main` points at in the local Hub cache (what from_pretrained loads offline), or None
    when it is not cached yet: then the id alone is hashed, and a later download of a newer `main`
    goes unnoticed until the cache records it."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    ref = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None


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
        from trainpipe.engine.lineage import nproc_per_node

        settings["launcher"] = {**settings["launcher"], "nproc_per_node": nproc_per_node(settings["launcher"])}
    datasets: dict[str, str | None] = {}
    if stage == "sft":
        datasets = {"sft": source_identity(config.datasets.sft), "eval": source_identity(config.datasets.eval)}
    elif stage == "dpo":
        datasets = {"preference": source_identity(config.datasets.preference),
                    "preference_eval": source_identity(config.datasets.preference_eval)}
    elif stage == "merge":
        datasets = {"sft": source_identity(config.datasets.sft)}  # gate 2 compares logits on SFT prompts
    return _digest({
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
        "versions": package_versions(),
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
