"""Gate mechanics: a gate is a list of checks. Parallel checks (cheap, independent) run together;
sequential ones run in order after them. Every result is collected, even when one fails or times out."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from trainpipe.config import PipelineConfig


@dataclass
class GateContext:
    stage: str
    output_path: str | None
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    config: PipelineConfig
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a check function returns."""

    passed: bool
    value: Any = None
    threshold: Any = None
    details: str = ""


@dataclass
class Check:
    name: str
    fn: Callable[[GateContext], Outcome]
    mode: Literal["parallel", "sequential"] = "sequential"
    timeout_s: float = 60.0
    severity: Literal["error", "warn"] = "error"


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


def _finish(check: Check, started: float, outcome: Outcome | None, error: str | None) -> CheckResult:
    duration = time.perf_counter() - started
    if outcome is None:
        return CheckResult(check.name, False, check.severity, check.mode, None, None, duration, error or "")
    return CheckResult(check.name, bool(outcome.passed), check.severity, check.mode, outcome.value,
                       outcome.threshold, duration, outcome.details)


def _call(check: Check, ctx: GateContext) -> Outcome:
    outcome = check.fn(ctx)
    if not isinstance(outcome, Outcome):
        raise TypeError(f"check returned {type(outcome).__name__}, expected validators.Outcome")
    return outcome


def run_gate(name: str, checks: list[Check], ctx: GateContext) -> GateOutcome:
    parallel = [c for c in checks if c.mode == "parallel"]
    sequential = [c for c in checks if c.mode != "parallel"]
    results: dict[str, CheckResult] = {}
    # Threads, not processes: these checks read files and metrics. A check that overruns is
    # recorded as failed and abandoned (its thread is a daemon and cannot block the gate).
    pool = ThreadPoolExecutor(max_workers=max(1, len(checks)), thread_name_prefix=f"gate-{name}")
    try:
        started = time.perf_counter()
        futures = [(c, pool.submit(_call, c, ctx)) for c in parallel]
        for check, future in futures:
            remaining = max(0.0, check.timeout_s - (time.perf_counter() - started))
            results[check.name] = _await(check, future, remaining, started)
        for check in sequential:
            begun = time.perf_counter()
            results[check.name] = _await(check, pool.submit(_call, check, ctx), check.timeout_s, begun)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return GateOutcome(name, [results[c.name] for c in checks])


def _await(check: Check, future: Any, timeout: float, started: float) -> CheckResult:
    try:
        return _finish(check, started, future.result(timeout=timeout), None)
    except FutureTimeout:
        return _finish(check, started, None, f"timed out after {check.timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, with its reason
        return _finish(check, started, None, f"check raised {type(exc).__name__}: {exc}")
