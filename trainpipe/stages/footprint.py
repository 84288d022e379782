"""What a run will write, per stage, estimated before it runs (the preflight refuses a run that clearly
does not fit; a full disk's message says what the stage writes).

The estimate is read from the base model's files (safetensors headers and config.json: no weights
are loaded, no torch) and the config. It is rough on purpose, and it counts what transformers keeps:
trainpipe sets no `save_total_limit`, so every checkpoint of a stage stays until the stage passes
(`save_intermediate: false` deletes them then). Each part is named, so the message says what it counted.

A Hub model not in the local cache is estimated from the Hub (`hub=True`, the preflight): its
parameter count from the one `model_info` the preflight asks (stages/hub_model.py), its shape from
its config.json (downloaded, a few kB; the run downloads it anyway), and the download itself, the
files transformers fetches into the HF cache, as a part of its own (`Estimate.download`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.diskspace import human

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# trainer_state.json, training_args.bin, rng_state.pth, scheduler.pt, README.md, configs: ~30 kB measured
# on the quickstart (a checkpoint of the tiny model is 306 kB, 69 kB of it the adapter).
CHECKPOINT_OVERHEAD_BYTES = 64 * 1024
# trainer_state.json keeps the whole log history, so it grows with the step it is saved at. Per logged
# step, measured on the quickstart: ~297 bytes for SFT (89 kB at step 300), ~685 for DPO (more
# metrics). Summed over a stage's checkpoints this was what the estimate missed (1.4 of 13.0 MB).
LOG_ENTRY_BYTES = {"sft": 320, "dpo": 720}
# The attempt's events file and stage log per step, measured: SFT ~820 bytes, DPO ~2 kB.
EVENT_BYTES_PER_STEP = {"sft": 900, "dpo": 2100}
# What transformers fetches from a model repo's top level besides the weights: config.json,
# generation_config.json, the safetensors index and the tokenizer's files.
DOWNLOADED_SUFFIXES = (".json", ".jinja")


@dataclass
class StageNeed:
    stage: str
    parts: list[tuple[str, int]] = field(default_factory=list)
    where: str | None = None  # the directory it goes into, when that is not output_dir (the download)
    copies: int = 1  # a sweep: how many of its trials write this stage (1: shared through the cache)
    trials: int = 0  # a sweep: its trial count (0: a single run)

    @property
    def each(self) -> int:
        return sum(size for _, size in self.parts)

    @property
    def total(self) -> int:
        return self.each * self.copies

    def line(self) -> str:
        into = f" into {self.where}" if self.where else ""
        text = (f"{self.stage} ~{human(self.each)}{into} ("
                + ", ".join(f"{label} {human(size)}" for label, size in self.parts) + ")")
        if self.trials and self.copies == 1:
            return f"{text} once, shared by the trials"
        if self.trials:
            return f"{text} in each of {self.copies} trials = ~{human(self.total)}"
        return text


@dataclass
class Estimate:
    stages: list[StageNeed]
    download: StageNeed | None = None  # an uncached Hub model: what the run downloads into the HF cache

    @property
    def total(self) -> int:
        """What goes into output_dir (the download is not in it)."""
        return sum(s.total for s in self.stages)

    def of(self, stage: str) -> StageNeed | None:
        return next((s for s in self.stages if s.stage == stage), None)

    def per_trial(self, copies: dict[str, int], trials: int) -> Estimate:
        """A sweep's: each stage written `copies[stage]` times (default once) of `trials` trials."""
        return Estimate([StageNeed(s.stage, s.parts, s.where, copies.get(s.stage, 1), trials) for s in self.stages],
                        self.download)


def estimate(config: Any, stages: list[str] | None = None, *, hub: bool = False) -> Estimate | None:
    """Bytes each enabled stage (or those in `stages`) will write, or None when the base model's size
    is unknown: a Hub id not in the local cache, unless `hub` (ask the Hub, see `explain`)."""
    return explain(config, stages, hub=hub)[0]


def explain(config: Any, stages: list[str] | None = None, *,
            hub: bool = False) -> tuple[Estimate | None, str | None]:
    """(the estimate, None), or (None, why there is none). With `hub`, a Hub id not in the local cache
    is estimated from the Hub, and what its download takes is `Estimate.download`."""
    download = None
    model = _model_dir(config.base_model)
    shapes = _model_shapes(model) if model is not None else None
    if shapes is None:
        if not _may_be_hub_id(config.base_model) or (model is not None and not hub):
            return None, (f"the base model's size cannot be read from {model or config.base_model} "
                          "(its safetensors headers and config.json)")
        if not hub:
            return None, f"'{config.base_model}' is not in the local HF cache, and the Hub was not asked"
        try:
            shapes, download = _hub_shapes(config.base_model)
        except Exception as exc:  # noqa: BLE001 - offline, a Hub error, an odd repo: the estimate is a guide
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            return None, (f"the size of '{config.base_model}' could not be read from the Hub "
                          f"({type(exc).__name__}: {first})")
    params, tokenizer_bytes, arch = shapes
    wanted = [s for s in ("sft", "merge", "dpo") if config.enabled(s) and (stages is None or s in stages)]
    needs = []
    for stage in wanted:
        need = StageNeed(stage)
        if stage == "merge":
            need.parts.append((f"merged model ({config.merge.dtype})", params * DTYPE_BYTES[config.merge.dtype]
                               + tokenizer_bytes))
        else:
            settings = getattr(config, stage)
            adapter = _lora_params(arch, settings.lora_r, settings.target_modules) * 4  # adapters train in float32
            steps = _planned_steps(config, stage, settings)
            if steps:
                interval = config.checkpoint_interval(stage)
                saved_at = list(range(interval, steps + 1, interval)) + ([steps] if steps % interval else [])
                # Each checkpoint: the adapter, AdamW's two moments of it, the tokenizer, trainer state
                # with the log history up to its step.
                one = adapter * 3 + tokenizer_bytes + CHECKPOINT_OVERHEAD_BYTES
                history = LOG_ENTRY_BYTES[stage] * sum(saved_at) // settings.logging_steps
                need.parts.append((f"{len(saved_at)} checkpoints", len(saved_at) * one + history))
                need.parts.append(("events and logs", steps * EVENT_BYTES_PER_STEP[stage]))
            need.parts.append(("adapter", adapter + tokenizer_bytes))
            if stage == "dpo" and settings.save_merged:
                # dpo.py's _save_merged writes the merged copy as the policy was loaded: full precision.
                need.parts.append(("merged copy (float32)", params * 4 + tokenizer_bytes))
        needs.append(need)
    return Estimate(needs, download), None


def _model_dir(name: str) -> Path | None:
    from trainpipe.stages.tiny_model import ASSET_DIR, is_builtin

    if is_builtin(name):
        return ASSET_DIR
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _may_be_hub_id(name: str) -> bool:
    from trainpipe.stages.tiny_model import is_builtin

    return not is_builtin(name) and not Path(name).expanduser().exists()


def _hub_shapes(repo_id: str) -> tuple[tuple[int, int, dict[str, Any]], StageNeed]:
    """(parameter count, tokenizer bytes, config.json) of a Hub model not in the local cache, and what
    downloading it takes: the Hub's `model_info` (asked once per process, stages/hub_model.py) and its
    config.json. Raises on any failure; `explain` reports it."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    from trainpipe.credentials import hub_token
    from trainpipe.stages.hub_model import model_info

    info = model_info(repo_id)
    raw = json.loads(Path(hf_hub_download(repo_id, "config.json", token=hub_token())).read_text(encoding="utf-8"))
    arch = raw.get("text_config") or raw
    sizes = {s.rfilename: s.size for s in info.siblings or [] if "/" not in s.rfilename}
    weights = _weight_files(list(sizes))
    if not weights:
        raise ValueError("the repo lists no *.safetensors weights")
    params = int(getattr(info.safetensors, "total", 0) or 0)
    dtype_bytes = DTYPE_BYTES.get(str(raw.get("torch_dtype") or raw.get("dtype")), 2)
    if not params and all(sizes[f] for f in weights):
        params = sum(sizes[f] for f in weights) // dtype_bytes
    if not params:
        raise ValueError("the Hub reports neither its parameter count nor its weights' sizes")
    tokenizer_bytes = sum(sizes.get(name) or 0 for name in TOKENIZER_FILES)
    # What the run downloads: the files above that the cache does not hold yet. A weight file whose
    # size the Hub did not report counts as its share of the parameters.
    fetched = [f for f in sizes if f in weights or f in TOKENIZER_FILES or f.endswith(DOWNLOADED_SUFFIXES)]
    missing = [f for f in fetched if not isinstance(try_to_load_from_cache(repo_id, f), str)]
    weight_bytes = sum(sizes[f] or params * dtype_bytes // len(weights) for f in missing if f in weights)
    other_bytes = sum(sizes[f] or 0 for f in missing if f not in weights)
    count = sum(1 for f in missing if f in weights)
    download = StageNeed("base model download", where=str(constants.HF_HUB_CACHE))
    if count:
        download.parts.append((f"{count} weight file{'s' if count > 1 else ''}", weight_bytes))
    if other_bytes:
        download.parts.append(("config and tokenizer files", other_bytes))
    return (params, tokenizer_bytes, arch), download


def _weight_files(files: list[str]) -> list[str]:
    """The safetensors files from_pretrained loads: the shards the index names (model-*), or
    model.safetensors; a repo's other copies (consolidated.safetensors) are not fetched."""
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    if "model.safetensors.index.json" in files:
        return [f for f in weights if f.startswith("model-")] or weights
    return [f for f in weights if f == "model.safetensors"] or weights


def _model_shapes(model: Path) -> tuple[int, int, dict[str, Any]] | None:
    """(parameter count, tokenizer bytes, config.json) from the files' headers alone."""
    try:
        arch = json.loads((model / "config.json").read_text(encoding="utf-8"))
        params = sum(_safetensors_numel(path) for path in model.glob("*.safetensors"))
    except (OSError, ValueError, struct.error):
        return None
    if not params:
        return None
    tokenizer_bytes = sum((model / name).stat().st_size for name in TOKENIZER_FILES if (model / name).is_file())
    return params, tokenizer_bytes, arch.get("text_config") or arch


def _safetensors_numel(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone. A file that is not safetensors counts
    0 here: the estimate is a guide, and loading the model reports the bad file with its name."""
    # The format: an 8-byte little-endian header length, then a JSON header of dtype/shape/offsets.
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return 0
        (length,) = struct.unpack("<Q", head)
        if length > min(path.stat().st_size - 8, 100_000_000):
            return 0
        try:
            header = json.loads(handle.read(length))
            return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
        except (ValueError, TypeError, KeyError, AttributeError):
            return 0


def _lora_params(arch: dict[str, Any], rank: int, targets: list[str]) -> int:
    """LoRA parameters of a Llama/Qwen-shaped decoder: rank x (in + out) per targeted projection."""
    hidden = int(arch.get("hidden_size") or 0)
    layers = int(arch.get("num_hidden_layers") or 0)
    heads = int(arch.get("num_attention_heads") or 1)
    head_dim = int(arch.get("head_dim") or (hidden // heads if heads else 0))
    kv = int(arch.get("num_key_value_heads") or heads) * head_dim
    inter = int(arch.get("intermediate_size") or 4 * hidden)
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    per_layer = sum(rank * (a + b) for name, (a, b) in dims.items() if name in targets)
    # Modules this table does not know (another architecture's names): count them as square.
    per_layer += sum(rank * 2 * hidden for name in targets if name not in dims)
    return per_layer * layers


def _planned_steps(config: Any, stage: str, settings: Any) -> int | None:
    """The optimizer steps the stage will take (transformers saves every `save_steps` and at the last
    step, and keeps them all); None when its data's row count is unknown without reading it."""
    if settings.max_steps:
        return settings.max_steps
    rows = _rows(config.datasets.sft if stage == "sft" else config.datasets.preference)
    if rows is None:
        return None
    per_step = settings.batch_size * settings.gradient_accumulation
    return math.ceil(math.ceil(rows / per_step) * settings.epochs)


def _rows(source: Any) -> int | None:
    """Training rows of a local JSONL source (its non-blank lines); None for any other source, whose
    row count the estimate then goes without."""
    from trainpipe.errors import DatasetError
    from trainpipe.stages import sources

    try:
        if source is None or not sources.read_line_by_line(source):
            return None
        files = sources.local_files(source)
    except DatasetError:
        return None
    count = 0
    for file in files:
        with open(file, "rb") as handle:
            count += sum(1 for line in handle if line.strip())
    return count
