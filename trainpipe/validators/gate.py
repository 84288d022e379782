"""Gate mechanics: a gate is a list of checks. Parallel checks (cheap, independent) run together;
sequential ones run after them, one at a time, in order. Every result is collected, even when a
check fails, crashes or overruns its timeout.

Each check runs in a forked child process, so a check past its timeout is killed, not abandoned.
The gate's model is loaded once, before the first check that needs it starts, and the children
share it copy-on-write. CUDA cannot be used from a forked child, so once CUDA is initialised the
checks run in threads instead; a thread past its timeout is recorded as failed and abandoned, and
it dies with the stage process, which exits right after the gate.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as wait_for_pipes
from typing import Any, Literal

from trainpipe.config import PipelineConfig


@dataclass
class Outcome:
    """What a check function returns.

    `outputs` are the generations the check produced ({"prompt", "output"} dicts). The gate adds
    them to `GateContext.generations`, where later checks (no_harmful_content) see them.
    """

    passed: bool
    value: Any = None
    threshold: Any = None
    details: str = ""
    outputs: list[dict[str, str]] = field(default_factory=list)


@dataclass
class GateContext:
    """What a check receives. A custom check is `def my_check(ctx: GateContext) -> Outcome`."""

    stage: str
    output_path: str | None
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    config: PipelineConfig
    inputs: dict[str, Any] = field(default_factory=dict)
    # Generations reported by the checks that ran before this one in the same gate.
    generations: list[dict[str, str]] = field(default_factory=list)
    resources: Any = None  # validators.resources.GateResources: model(), generate(); None when torch-free
    # What the stage computed in memory for its gate (e.g. the merge's reference logits), by name.
    from_stage: dict[str, Any] = field(default_factory=dict)

    def logged(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every logged value of `key`, in order."""
        return [(int(e.get("step", 0)), float(e[key])) for e in self.log_history
                if key in e and isinstance(e[key], (int, float))]


@dataclass
class Check:
    name: str
    fn: Callable[[GateContext], Outcome]
    mode: Literal["parallel", "sequential"] = "sequential"
    timeout_s: float = 60.0
    severity: Literal["error", "warn"] = "error"
    needs_model: bool = False


@dataclass
class CheckResult:
    name: str
    passed: bool
    severity: str
    mode: str
    value: Any
    threshold: Any
    duration_s: float
    details: str


@dataclass
class GateOutcome:
    gate: str
    checks: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.severity == "error")

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def as_rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]

    @classmethod
    def from_rows(cls, gate: str, rows: list[dict[str, Any]]) -> GateOutcome:
        return cls(gate, [CheckResult(**row) for row in rows])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _result(check: Check, duration: float, outcome: Outcome | None, error: str | None) -> CheckResult:
    if outcome is None:
        return CheckResult(check.name, False, check.severity, check.mode, None, None, duration, error or "")
    return CheckResult(check.name, bool(outcome.passed), check.severity, check.mode, _jsonable(outcome.value),
                       _jsonable(outcome.threshold), duration, outcome.details)


def _call(check: Check, ctx: GateContext) -> Outcome:
    outcome = check.fn(ctx)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"check returned {type(outcome).__name__}, expected trainpipe.validators.Outcome")
    return outcome


def _fork_is_safe() -> bool:
    if not hasattr(os, "fork"):
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def run_gate(name: str, checks: list[Check], ctx: GateContext, *, isolation: str = "auto") -> GateOutcome:
    if isolation == "auto":
        isolation = "process" if _fork_is_safe() else "thread"
    if ctx.resources is not None and any(c.needs_model for c in checks):
        ctx.resources.preload()
    run_batch = _run_in_processes if isolation == "process" else _run_in_threads
    results: dict[str, CheckResult] = {}
    batches = [[c for c in checks if c.mode == "parallel"]] + [[c] for c in checks if c.mode != "parallel"]
    for batch in batches:
        if not batch:
            continue
        for check, (result, outcome) in zip(batch, run_batch(batch, ctx)):
            results[check.name] = result
            if outcome is not None:
                ctx.generations.extend(outcome.outputs)
    return GateOutcome(name, [results[c.name] for c in checks])


def _child(check: Check, ctx: GateContext, pipe: Any) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        # OpenMP's thread pool does not survive fork; a single thread in the child does.
        torch.set_num_threads(1)
    try:
        pipe.send(("ok", _call(check, ctx)))
    except BaseException as exc:  # noqa: BLE001 - a crashing check is a failed check, with its reason
        pipe.send(("error", f"check raised {type(exc).__name__}: {exc}"))


def _run_in_processes(batch: list[Check], ctx: GateContext) -> list[tuple[CheckResult, Outcome | None]]:
    fork = multiprocessing.get_context("fork")
    started = time.perf_counter()
    running: dict[Any, tuple[int, Any]] = {}
    done: dict[int, tuple[CheckResult, Outcome | None]] = {}
    for index, check in enumerate(batch):
        receiver, sender = fork.Pipe(duplex=False)
        process = fork.Process(target=_child, args=(check, ctx, sender), daemon=True,
                               name=f"check-{check.name}")
        process.start()
        sender.close()
        running[receiver] = (index, process)
    while running:
        now = time.perf_counter() - started
        next_deadline = min(batch[i].timeout_s for i, _p in running.values()) - now
        for receiver in wait_for_pipes(list(running), timeout=max(0.0, next_deadline)):
            index, process = running.pop(receiver)
            check = batch[index]
            try:
                status, payload = receiver.recv()
            except EOFError:
                process.join(5)
                status, payload = "error", f"check process died (exit code {process.exitcode})"
            process.join(5)
            duration = time.perf_counter() - started
            outcome = payload if status == "ok" else None
            done[index] = (_result(check, duration, outcome, None if status == "ok" else payload), outcome)
        now = time.perf_counter() - started
        for receiver, (index, process) in list(running.items()):
            check = batch[index]
            if now >= check.timeout_s:
                process.kill()
                process.join(5)
                running.pop(receiver)
                done[index] = (_result(check, now, None, f"timed out after {check.timeout_s:g} s"), None)
    return [done[i] for i in range(len(batch))]


def _run_in_threads(batch: list[Check], ctx: GateContext) -> list[tuple[CheckResult, Outcome | None]]:
    pool = ThreadPoolExecutor(max_workers=len(batch), thread_name_prefix="check")
    started = time.perf_counter()
    futures = [pool.submit(_call, check, ctx) for check in batch]
    done = []
    try:
        for check, future in zip(batch, futures):
            remaining = max(0.0, check.timeout_s - (time.perf_counter() - started))
            try:
                outcome = future.result(timeout=remaining)
                done.append((_result(check, time.perf_counter() - started, outcome, None), outcome))
            except FutureTimeout:
                done.append((_result(check, time.perf_counter() - started, None,
                                     f"timed out after {check.timeout_s:g} s"), None))
            except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, with its reason
                done.append((_result(check, time.perf_counter() - started, None,
                                     f"check raised {type(exc).__name__}: {exc}"), None))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return done
