"""Child-process entry point: `python -m trainpipe.stages.worker SPEC.json`.

Running each stage in its own process means an OOM or a segfault cannot take the orchestrator
down, and GPU memory is fully released between stages. The child reports through the events file
as it goes and writes RESULT.json once at the end; no result file means the child died.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from trainpipe.stages import STAGES
from trainpipe.stages.base import EventWriter, StageContext, StageSpec, write_json_atomic

EXIT_PREEMPTED = 75


def _fault_for(stage: str) -> dict:
    raw = os.environ.get("TRAINPIPE_FAULT")
    if not raw:
        return {}
    fault = json.loads(raw)
    return fault if fault.get("stage") == stage else {}


def main(argv: list[str]) -> int:
    spec = StageSpec.load(Path(argv[1]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainpipe.config import config_from_snapshot
    from trainpipe.errors import TrainpipeError
    from trainpipe.stages.training import Preempted, install_preemption_handler

    install_preemption_handler()
    spec.fault = spec.fault or _fault_for(spec.stage)
    ctx = StageContext(spec=spec, config=config_from_snapshot(spec.config), events=EventWriter(Path(spec.events_path)))
    result_path = Path(spec.result_path)
    try:
        result = importlib.import_module(STAGES[spec.stage]).run(ctx)
    except Preempted as exc:
        write_json_atomic(result_path, {"ok": False, "kind": "preempted", "error": str(exc)})
        return EXIT_PREEMPTED
    except TrainpipeError as exc:
        write_json_atomic(result_path, {"ok": False, "kind": "user", "error": exc.message})
        return 2
    except BaseException as exc:  # noqa: BLE001 - the orchestrator decides what a failure means
        kind = "oom" if _is_oom(exc) else "error"
        write_json_atomic(result_path, {"ok": False, "kind": kind, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1
    write_json_atomic(result_path, {"ok": True, **asdict(result)})
    return 0


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:
        return False
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
