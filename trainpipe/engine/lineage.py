"""The run's lineage: where its model came from and what it ran on, recorded once, at run creation,
in `runs.lineage`; and the check that compares it with the environment a resume would run in.

Torch-free, like the fingerprints (both read identities from engine/identity.py): versions come from
package metadata, the device from the NVIDIA device nodes, so recording it never loads torch. The
artifacts' sha256 and size are not copied here: the `artifacts` table has them, and `inspect` joins
the two (engine/report.py). Nothing secret goes in: no environment variable is read but
ATEN_CPU_CAPABILITY.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from trainpipe.config import STAGE_ORDER, PipelineConfig
from trainpipe.engine.identity import base_model_identity, cuda_device_visible, gpu_name, world_size
from trainpipe.engine.identity import dataset_identity as source_identity
from trainpipe.versions import package_versions

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
             "huggingface_hub", "trainpipe")
# A new major version of these changes what a checkpoint holds or how training resumes from it
# (optimizer and scheduler state, trainer state, adapter format, data loading order).
MAJOR_CHECKED = ("torch", "transformers", "trl", "peft", "datasets")


def config_sha256(snapshot: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True, default=str).encode()).hexdigest()


def environment(config: PipelineConfig) -> dict[str, Any]:
    """What a resume compares: library versions, device, CPU kernel and each enabled stage's world size."""
    cuda = cuda_device_visible()
    return {
        "libraries": {"python": platform.python_version(), **package_versions(LIBRARIES)},
        "device": {"type": "cuda" if cuda else "cpu", "gpu": gpu_name() if cuda else None},
        # Each CPU kernel rounds differently (docs/getting-started.md, "Same outcome on every CPU"); None is the default one.
        "cpu_kernel": os.environ.get("ATEN_CPU_CAPABILITY") or None,
        "world_size": {name: world_size(getattr(config, name).model_dump(mode="json"))
                       for name in STAGE_ORDER if config.enabled(name)},
    }


def build(config: PipelineConfig, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The lineage record stored at run creation."""
    datasets = {role: {"source": source.label(), **(source_identity(source) or {})}
                for role, source in config.datasets if source is not None}
    return {
        "config_sha256": config_sha256(snapshot),
        "seed": config.seed,
        "base_model": {"name": config.base_model, **base_model_identity(config.base_model)},
        "datasets": datasets,
        **environment(config),
        "recorded_at": time.time(),
    }


# ---------------------------------------------------------------- the resume check


class Difference(NamedTuple):
    key: str
    recorded: Any
    now: Any
    breaking: bool
    why: str = ""

    def line(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return f"{self.key}: {_shown(self.recorded)} -> {_shown(self.now)}{why}"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "recorded": self.recorded, "now": self.now, "breaking": self.breaking}


def _shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _major(version: str | None) -> str | None:
    if not version:
        return None
    head = version.split(".", 1)[0]
    return head if head.isdigit() else version


def baseline(lineage: Mapping[str, Any], resume_details: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The environment the run last ran in: its lineage, overlaid by the environment each earlier
    resume recorded (that resume's differences were accepted then, with --force where needed)."""
    base = {key: lineage.get(key) for key in ("libraries", "device", "cpu_kernel", "world_size")}
    for detail in resume_details:
        now = (detail or {}).get("environment", {}).get("now") if isinstance(detail, Mapping) else None
        if isinstance(now, Mapping):
            base = {key: now.get(key, base.get(key)) for key in base}
    return base


def compare(recorded: Mapping[str, Any], now: Mapping[str, Any], pending_stages: Iterable[str]) -> list[Difference]:
    """Every difference between two environments (`environment()`'s shape), breaking ones first.
    World size matters only for stages still to run: a finished stage's output does not change."""
    diffs: list[Difference] = []
    old_libs, new_libs = recorded.get("libraries") or {}, now.get("libraries") or {}
    for name in sorted(set(old_libs) | set(new_libs), key=lambda n: (n not in MAJOR_CHECKED, n)):
        old, new = old_libs.get(name), new_libs.get(name)
        if old == new:
            continue
        new_major = _major(old) != _major(new)
        diffs.append(Difference(name, old, new, name in MAJOR_CHECKED and new_major,
                                "major version" if new_major else "minor/patch version"))
    old_dev, new_dev = recorded.get("device") or {}, now.get("device") or {}
    if old_dev.get("type") != new_dev.get("type"):
        diffs.append(Difference("device", old_dev.get("type"), new_dev.get("type"), True))
    elif old_dev.get("gpu") != new_dev.get("gpu"):
        diffs.append(Difference("gpu", old_dev.get("gpu"), new_dev.get("gpu"), False))
    old_ws, new_ws = recorded.get("world_size") or {}, now.get("world_size") or {}
    for stage in pending_stages:
        if stage in old_ws or stage in new_ws:
            old, new = old_ws.get(stage, 1), new_ws.get(stage, 1)
            if old != new:
                diffs.append(Difference(f"world size ({stage})", old, new, True))
    if recorded.get("cpu_kernel") != now.get("cpu_kernel"):
        diffs.append(Difference("cpu kernel (ATEN_CPU_CAPABILITY)", recorded.get("cpu_kernel"),
                                now.get("cpu_kernel"), False, "results differ in the last bits"))
    return sorted(diffs, key=lambda d: not d.breaking)
