"""Child-process entry point: `python -m trainpipe.attempt.worker SPEC.json`.

Running each stage in its own process means an OOM or a segfault cannot take the orchestrator
down, and GPU memory is fully released between stages. The child reports through the events file
as it goes and writes RESULT.json once at the end; no result file means the child died.

Under torchrun (a stage's `launcher`) this module runs once per rank. Rank 0 alone writes events,
the result, the output and runs the gate; the other ranks train, then exit 0 (or non-zero on an
error, which makes torchrun fail the attempt).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainpipe import faults
from trainpipe.stages import STAGES
from trainpipe.stages.base import EventWriter, StageContext, StageSpec, write_json_atomic

EXIT_PREEMPTED = 75


def main(argv: list[str]) -> int:
    from trainpipe.stages import distributed

    distributed.die_with_launcher()
    spec = StageSpec.load(Path(argv[1]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainpipe.config import config_from_snapshot
    from trainpipe.diskspace import full_disk_message
    from trainpipe.errors import TrainpipeError
    from trainpipe.failures import ENVIRONMENT, USER, classify, describe
    from trainpipe.stages.training import OtherRankDone, Preempted, install_preemption_handler, stop_at_once

    install_preemption_handler()
    spec.fault = spec.fault or faults.stage_fault(spec.stage)
    main_rank = distributed.is_main()
    events = EventWriter(Path(spec.events_path) if main_rank else None)
    ctx = StageContext(spec=spec, config=config_from_snapshot(spec.config), events=events)
    # When the stage's own code starts: benchmarks/overhead.py measures process start-up up to here.
    ctx.events.emit("started", pid=os.getpid(), preloaded="trl" in sys.modules)
    result_path = Path(spec.result_path) if main_rank else _rank_result_path(spec)
    try:
        # Until the gate is done, a stop request outside a training step stops the stage at once.
        with stop_at_once():
            faults.at_point(spec.fault, "start")
            memory_fraction = _limit_gpu_memory(ctx.config.gpu_memory_fraction)
            result = importlib.import_module(STAGES[spec.stage]).run(ctx)
            result.metrics["gpu_memory_fraction"] = memory_fraction
            # As torch ran it: OMP_NUM_THREADS, or one per core (a parallel sweep shares them out).
            result.metrics["cpu_threads"] = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
            if distributed.world_size() > 1:
                result.metrics["world_size"] = distributed.world_size()
                result.metrics["ddp_backend"] = distributed.SEEN.get("backend")
                # torchrun's count of the nodes whose agents met (one torchrun per node)
                result.metrics["torchrun_nodes"] = int(os.environ.get("GROUP_WORLD_SIZE") or 1)
            faults.tamper_output(spec.fault, result.output_path)
            faults.at_point(spec.fault, "gate")
            hashed = _hash_beside_the_gate(result.output_path) if main_rank else None
            gate = _run_gate(ctx, result)
            output_files = hashed() if hashed else None
    except OtherRankDone:
        return 0
    except Preempted as exc:
        if not main_rank:
            return 0  # rank 0 reports the stop; a non-zero exit here would only make torchrun tear down
        write_json_atomic(result_path, {"ok": False, "kind": "preempted", "error": str(exc)})
        return EXIT_PREEMPTED
    except BaseException as exc:  # noqa: BLE001 - classified here, decided on by the orchestrator
        needed = _stage_need(ctx)
        failure = classify(exc, written_dirs=[spec.work_dir, spec.output_dir],
                           needed_bytes=needed.total if needed else 0)
        error = describe(exc)
        if failure.kind == USER and not isinstance(exc, TrainpipeError):
            # Library errors rarely say which model or file they were loading; the inputs do.
            error += " (stage inputs: " + ", ".join(f"{k}={v}" for k, v in spec.inputs.items() if v) + ")"
        if failure.kind == ENVIRONMENT:
            # The orchestrator adds what the stage writes (stage_attempt._stage_need_text).
            error = full_disk_message(failure.where or spec.work_dir, failure.reason or "no space left on device")
        try:
            write_json_atomic(result_path, {"ok": False, "kind": failure.cause, "error_kind": failure.kind,
                                            "error": error, "traceback": traceback.format_exc()})
            traceback.print_exc()  # into stage.log
        except OSError:
            # The disk that failed the stage can fail its report too: the orchestrator, finding no
            # result, asks the disk itself (engine/supervisor.py).
            pass
        return 2 if failure.kind == USER else 1
    write_json_atomic(result_path, {"ok": True, **asdict(result), "gate": gate, "output_files": output_files})
    return 0


def _hash_beside_the_gate(output_path: str) -> Any:
    """Start hashing the stage's output on a thread, while the gate runs; returns the wait for it:
    [[path relative to the output, size, sha256, mtime_ns before hashing], ...], or None if hashing
    failed. The orchestrator records these hashes when every file still has that size and mtime
    (engine/stage_attempt.py), so a merged model is not read again after the stage: at 0.5B that was
    ~0.8 s after the gate, at 70B ~140 GB."""
    from concurrent.futures import ThreadPoolExecutor

    from trainpipe.checkpoints import sha256_files, tree_files

    def hashed() -> list[list[Any]]:
        root = Path(output_path)
        paths = tree_files(root)
        # Stat before reading: a file written to while it is hashed has a newer mtime than recorded.
        stats = [p.stat() for p in paths]
        return [[str(p.relative_to(root)), st.st_size, digest, st.st_mtime_ns]
                for p, st, digest in zip(paths, stats, sha256_files(paths))]

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(hashed)

    def wait() -> list[list[Any]] | None:
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - the orchestrator hashes the output itself then
            return None
        finally:
            pool.shutdown()

    return wait


def _stage_need(ctx: StageContext) -> Any:
    """What this stage writes (stages/footprint.py), for the message a full disk gets; None if unknown."""
    from trainpipe.stages.footprint import estimate

    try:
        found = estimate(ctx.config, [ctx.spec.stage])
    except Exception:  # noqa: BLE001 - an estimate must never hide the error being reported
        return None
    return found.of(ctx.spec.stage) if found else None


def _rank_result_path(spec: StageSpec) -> Path:
    """Where a rank other than 0 writes its failure, if it has one: result-N.rankR.json. The
    orchestrator reads it when rank 0 has nothing better to say (engine/supervisor.py)."""
    from trainpipe.stages import distributed

    return Path(spec.result_path).with_suffix(f".rank{distributed.rank()}.json")


def _limit_gpu_memory(fraction: float) -> float | None:
    """Cap this process's share of GPU memory (the caching allocator raises OOM beyond it), so that
    other work on the GPU keeps its share; recorded with the stage's metrics. None on a machine
    without CUDA, where there is nothing to cap."""
    import torch

    if not torch.cuda.is_available():
        return None
    from trainpipe.stages import distributed

    # Initialises CUDA in this stage process only: the pre-imported worker that forked it never does.
    if distributed.world_size() > 1:
        torch.cuda.set_device(distributed.local_rank())
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def _run_gate(ctx: StageContext, result: Any) -> dict[str, Any] | None:
    """The gate runs here, in the stage's process: torch and the libraries are already imported,
    which saves a second process start per stage."""
    from trainpipe.validators import GATES, GateContext, evaluate
    from trainpipe.validators.resources import GateResources

    if ctx.spec.stage not in GATES:
        return None
    ctx.events.emit("validating", output_path=result.output_path, metrics=result.metrics,
                    log_history=result.log_history, final_model_path=result.final_model_path)
    gate_ctx = GateContext(stage=ctx.spec.stage, output_path=result.output_path, metrics=result.metrics,
                           log_history=result.log_history, config=ctx.config, inputs=dict(ctx.spec.inputs),
                           from_stage=ctx.for_gate)
    gate_ctx.resources = GateResources(gate_ctx)
    # The trainer and its model are out of scope by now; free their memory before the gate loads one.
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    outcome = evaluate(gate_ctx)
    _save_generations(Path(ctx.spec.events_path).with_name(f"generations-{ctx.spec.attempt}.jsonl"),
                      gate_ctx.generations)
    return {"gate": outcome.gate, "checks": outcome.as_rows()}


def _save_generations(path: Path, generations: list[dict[str, Any]]) -> None:
    """What the gate's checks generated and scored (held-out and red-team outputs, with the problem a
    check found in each), next to the attempt's events: `trainpipe ui` shows them under the gate."""
    if generations:
        lines = [json.dumps({k: g.get(k) for k in ("check", "prompt", "output", "problem")}, default=str)
                 for g in generations]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    exit_code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown, as in an attempt forked from the pre-imported worker: it would free the
    # process group that distributed.finish() keeps, and that can deadlock (see KEPT_GROUPS there).
    # Everything the orchestrator reads (result, events, checkpoints) is on disk by now.
    os._exit(exit_code)
