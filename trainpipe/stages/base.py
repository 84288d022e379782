"""What a stage receives and returns. A stage runs in its own child process (attempt/worker.py) and
talks to the orchestrator through an append-only events file and a final result file."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainpipe.config import PipelineConfig


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a torn write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not be left fuller by a torn temporary file
        raise


class EventWriter:
    """Appends one JSON object per line; the orchestrator tails the file for progress and checkpoints."""

    def __init__(self, path: Path | None):
        # None: a DDP rank other than 0, whose events would only repeat rank 0's.
        self._handle = path.open("a", encoding="utf-8", buffering=1) if path is not None else None

    def emit(self, kind: str, **data: Any) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps({"type": kind, "time": time.time(), **data}, default=str) + "\n")
        self._handle.flush()


@dataclass
class StageSpec:
    """Everything the child process needs, serialised to JSON by the orchestrator."""

    stage: str
    run_id: str
    attempt: int
    config: dict[str, Any]
    run_dir: str
    output_dir: str          # where the finished output is renamed to
    work_dir: str            # checkpoints, logs, staging
    events_path: str
    result_path: str
    inputs: dict[str, str | None] = field(default_factory=dict)
    resume_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    fault: dict[str, Any] = field(default_factory=dict)  # test-only fault injection, see faults.py

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> StageSpec:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@dataclass
class StageContext:
    spec: StageSpec
    config: PipelineConfig
    events: EventWriter
    # Handed to the stage's gate in memory (GateContext.from_stage); never serialised.
    for_gate: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output_dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.spec.work_dir)

    def settings(self) -> Any:
        """The stage's settings with any retry overrides (e.g. OOM's halved batch) applied."""
        base = getattr(self.config, self.spec.stage)
        return base.model_copy(update=self.spec.overrides) if self.spec.overrides else base


@dataclass
class StageResult:
    output_path: str
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    final_model_path: str | None = None
