"""Sweeps: trials of one pipeline over a space of settings, chosen by Optuna (ask-and-tell).

Each trial is an ordinary run (run id `<sweep id>-t<number>`), linked to its sweep in the ledger, so
`status`, `inspect` and `resume` work on it. Trials share work through the stage cache: trials that
agree on every setting up to a stage have the same fingerprint there, so a sweep over `dpo.beta`
trains SFT and merge once. Trials run one after another, so a shared stage is never trained twice
at the same time: the first trial trains it, the later ones find it passed.

Where the search state lives: Optuna's study is in memory, and the ledger (tables `sweeps` and
`sweep_trials`) is the only record. `sweep --resume` rebuilds the study by replay: the same seeded
sampler, asked again in the same order and told the same recorded outcomes, proposes the same
parameters, which are checked against the ledger's. So no Optuna table, nor its `alembic_version`,
ever enters the ledger's database, and a sweep needs no second database file.
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainpipe.config import STAGE_ORDER
from trainpipe.config.sweepfile import SweepSpec, load_sweep, param_overrides, trial_count
from trainpipe.engine import driver, liveness, preflight
from trainpipe.engine.identity import cuda_device_visible
from trainpipe.engine.observer import Observer
from trainpipe.engine.sweep_report import objective_value, reconcile, report, sweep_spec, write_outputs
from trainpipe.engine.sweep_study import new_study, same_params, space_distributions
from trainpipe.errors import (
    EXIT_GATE_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    ConfigError,
    IllegalTransition,
    RunOwned,
    TrainpipeError,
)
from trainpipe.paths import check_run_id
from trainpipe.store.ledger import HOST, Ledger, StaleState


# How often a sweep's owner looks at trials other workers are running.
WAIT_POLL_S = 2.0


class SweepObserver(Observer):
    """Run progress (the Observer methods) plus the sweep's own."""

    def sweep_created(self, sweep_id: str, total: int) -> None: ...
    def trial_started(self, number: int, total: int, params: dict[str, Any], run_id: str, resumed: bool) -> None: ...
    def trial_finished(self, number: int, state: str, objective: float | None) -> None: ...


@dataclass
class SweepResult:
    sweep_id: str
    state: str
    exit_code: int
    report: dict[str, Any]


def new_sweep_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def start(sweep_file: str, *, ledger: Ledger, extra_sets: list[str] | None = None,
          observer: SweepObserver | None = None, parallel: int = 1, force: bool = False) -> SweepResult:
    """Validate the sweep file (and the base config, its datasets and the preflight, whose disk check
    counts every trial), then create the sweep and run its trials, `parallel` at a time. Bad input
    raises ConfigError before anything is written. `force` starts (and starts each trial) even when
    the disk looks too small."""
    spec, config = load_sweep(sweep_file, extra_sets=extra_sets)
    _check_parallel(spec, parallel, sweep_file)
    preflight.validate_inputs(config)
    notes = preflight.check(config, ledger, check_disk=not force, sweep=disk_copies(spec, config))
    sweep_id = check_run_id(new_sweep_id(spec.name or f"{config.pipeline_id}-sweep"))
    ledger.create_sweep(sweep_id=sweep_id, sweep_file=str(Path(sweep_file).resolve()),
                        spec={"sweep": spec.model_dump(mode="json"), "output_dir": config.output_dir, "force": force})
    if spec.strategy != "tpe":
        ledger.add_sweep_trials(sweep_id, _plan(spec, sweep_id))
    return _drive(ledger, sweep_id, observer or SweepObserver(), parallel=parallel, notes=notes)


def disk_copies(spec: SweepSpec, config: Any) -> preflight.SweepCopies:
    """How many trials write each stage: one when no swept key touches it or a stage upstream of it
    (the other trials reuse it through the stage cache), else every trial. `seed` touches them all."""
    from trainpipe.engine.fingerprint import upstream_stage

    trials = min(trial_count(spec), spec.max_trials)
    touched = {key.split(".", 1)[0] if key.split(".", 1)[0] in STAGE_ORDER else "*" for key in spec.space}
    copies: dict[str, int] = {}
    for stage in STAGE_ORDER:  # upstream first
        up = upstream_stage(config, stage)
        varies = bool(touched & {"*", stage}) or (up is not None and copies.get(up, 1) > 1)
        copies[stage] = trials if varies else 1
    return preflight.SweepCopies(trials, copies)


def resume(sweep_id: str, *, ledger: Ledger, observer: SweepObserver | None = None, parallel: int = 1) -> SweepResult:
    """Keep the finished trials, resume an interrupted one, start the rest."""
    sweep = reconcile(ledger, ledger.get_sweep(sweep_id))
    _check_parallel(sweep_spec(sweep), parallel, sweep["sweep_file"])
    if sweep["state"] == "running":
        raise RunOwned(f"sweep {sweep_id} is owned by pid {sweep['owner_pid']} on host {sweep['owner_host']}",
                       hint="wait for it to finish, or stop that process first")
    if sweep["state"] == "finished":
        raise IllegalTransition(f"sweep {sweep_id} is finished; nothing to resume",
                                hint=f"`trainpipe sweep-status {sweep_id}` shows its results")
    try:
        ledger.set_sweep_state(sweep_id, "running", expect_state=sweep["state"], set_owner=True)
    except StaleState:
        raise RunOwned(f"sweep {sweep_id} was just claimed by another process") from None
    return _drive(ledger, sweep_id, observer or SweepObserver(), parallel=parallel)


def work(sweep_id: str, *, ledger: Ledger, observer: SweepObserver | None = None) -> SweepResult:
    """Join a sweep as an extra worker (this or another machine, on the same ledger): claim trials one
    at a time until none is left. The worker that records the last trial writes the results."""
    sweep = reconcile(ledger, ledger.get_sweep(sweep_id))
    spec = sweep_spec(sweep)
    if spec.strategy == "tpe":
        raise ConfigError(f"sweep {sweep_id} uses strategy tpe, whose trials run one at a time (each depends on "
                          "the results before it); only grid and random sweeps take extra workers")
    if sweep["state"] == "finished":
        raise IllegalTransition(f"sweep {sweep_id} is finished; nothing to do",
                                hint=f"`trainpipe sweep-status {sweep_id}` shows its results")
    observer = observer or SweepObserver()
    observer.sweep_created(sweep_id, trial_count(spec))
    if _work(ledger, sweep_id, spec, observer):
        return SweepResult(sweep_id, "interrupted", EXIT_INTERRUPTED, report(ledger, sweep_id))
    return _finish_if_done(ledger, sweep_id) or SweepResult(sweep_id, ledger.get_sweep(sweep_id)["state"], EXIT_OK,
                                                            report(ledger, sweep_id))


def _check_parallel(spec: SweepSpec, parallel: int, source: str) -> None:
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be 1 or more")
    if parallel > 1 and spec.strategy == "tpe":
        raise ConfigError(f"{source}: key 'strategy': tpe runs one trial at a time (each trial depends on the "
                          "results before it); use grid or random with --parallel")


def _plan(spec: SweepSpec, sweep_id: str) -> list[tuple[int, dict[str, Any], str]]:
    """Every trial of a grid or random sweep, asked up front: neither sampler looks at results, so the
    list is the one a trial-by-trial ask would give, and workers can claim trials from it."""
    study = new_study(spec)
    distributions = space_distributions(spec)
    plan = []
    for number in range(trial_count(spec)):
        trial = study.ask(distributions)
        plan.append((number, dict(trial.params), f"{sweep_id}-t{number:03d}"))
    return plan


def _drive(ledger: Ledger, sweep_id: str, observer: SweepObserver, parallel: int = 1,
           notes: list[str] | None = None) -> SweepResult:
    sweep = ledger.get_sweep(sweep_id)
    spec = sweep_spec(sweep)
    observer.sweep_created(sweep_id, trial_count(spec))
    for note in notes or []:
        observer.note(note)
    if spec.strategy == "tpe":
        interrupted = _ask_and_tell(ledger, sweep_id, spec, observer)
    else:
        admitted = parallel
        if parallel > 1 and cuda_device_visible():
            fraction = _memory_fraction(spec)
            admitted = trials_that_fit(parallel, fraction, cuda=True)
            if admitted < parallel:
                observer.note(f"--parallel {parallel}: {admitted} trial(s) at once, as many as fit on the "
                              f"GPU with gpu_memory_fraction {fraction:g} each")
        threads_before = os.environ.get("OMP_NUM_THREADS")
        if admitted == parallel > 1 and not cuda_device_visible():
            note = share_cpu_threads(parallel)
            if note:
                observer.note(note)
        workers: list[subprocess.Popen] = []
        try:
            workers = _spawn_workers(ledger, sweep_id, admitted - 1)
            interrupted = _work(ledger, sweep_id, spec, observer)
            # Trials still running elsewhere (this sweep's workers, or a worker another machine started):
            # wait, and take over any whose worker dies.
            while not interrupted and any(t["state"] != "done" for t in ledger.sweep_trials(sweep_id)):
                time.sleep(WAIT_POLL_S)
                interrupted = _work(ledger, sweep_id, spec, observer)
        finally:
            for proc in workers:
                proc.wait()
            if threads_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
    if interrupted:
        ledger.set_sweep_state(sweep_id, "interrupted")
        return SweepResult(sweep_id, "interrupted", EXIT_INTERRUPTED, report(ledger, sweep_id))
    result = _finish_if_done(ledger, sweep_id)
    assert result is not None
    return result


def share_cpu_threads(parallel: int) -> str | None:
    """Give each of `parallel` CPU trials its share of the cores, through OMP_NUM_THREADS, which this
    process's stage workers and sweep workers inherit (torch reads it when it loads). Each stage
    otherwise starts one OpenMP thread per core, and N such processes spinning on the same cores ran
    the quickstart 13x slower, not 2x (benchmarks/RESULTS.md, "Parallel CPU trials"). A value the user
    set is kept. Returns the note to show."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    from trainpipe.cpus import usable_cores

    cores = usable_cores()
    threads = max(1, cores // parallel)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return (f"--parallel {parallel} on {cores} CPU cores: each trial's stages use {threads} thread(s) "
            "(OMP_NUM_THREADS; set it yourself to choose)")


def trials_that_fit(parallel: int, gpu_memory_fraction: float, *, cuda: bool) -> int:
    """How many trials may train at once. On a GPU each stage process caps itself at
    gpu_memory_fraction of the device (attempt/worker.py), so only as many trials as those shares fit
    in one device are admitted; on CPU, `parallel` processes."""
    if not cuda:
        return parallel
    return max(1, min(parallel, int(1 / gpu_memory_fraction + 1e-9)))


def _memory_fraction(spec: SweepSpec) -> float:
    from trainpipe.config import load_config

    return load_config(spec.base, overrides=spec.set).gpu_memory_fraction


def _finish_if_done(ledger: Ledger, sweep_id: str) -> SweepResult | None:
    """Once every trial is done: mark the sweep finished (once: a compare-and-set) and write the results."""
    if any(t["state"] != "done" for t in ledger.sweep_trials(sweep_id)):
        return None
    sweep = ledger.get_sweep(sweep_id)
    if sweep["state"] != "finished":
        best = report(ledger, sweep_id)["best"]
        try:
            ledger.set_sweep_state(sweep_id, "finished", expect_state=sweep["state"],
                                   best_trial=best["number"] if best else None)
            write_outputs(ledger, sweep_id)
        except StaleState:
            pass  # another worker finished it
    summary = report(ledger, sweep_id)
    if summary["best"]:
        code = EXIT_OK
    elif any(r["state"] == "rejected" for r in summary["trials"]):
        code = EXIT_GATE_REJECTED
    else:
        code = EXIT_STAGE_FAILED
    return SweepResult(sweep_id, "finished", code, summary)


def _ask_and_tell(ledger: Ledger, sweep_id: str, spec: SweepSpec, observer: SweepObserver) -> bool:
    """TPE, one trial at a time: each ask sees every earlier result. On resume the recorded trials are
    replayed (asked again, checked, told again) before new ones are asked. True if interrupted."""
    from optuna.trial import TrialState

    distributions = space_distributions(spec)
    study = new_study(spec)
    total = trial_count(spec)
    recorded = {row["number"]: row for row in ledger.sweep_trials(sweep_id)}
    for number in range(total):
        trial = study.ask(distributions)
        row = recorded.get(number)
        if row is None:
            row = {"number": number, "params": dict(trial.params), "run_id": f"{sweep_id}-t{number:03d}",
                   "state": "running", "objective": None, "sweep_id": sweep_id}
            ledger.add_sweep_trials(sweep_id, [(number, row["params"], row["run_id"])], claim=True)
        elif not same_params(trial.params, row["params"]):
            raise TrainpipeError(f"sweep {sweep_id}: replaying trial {number} proposed {trial.params}, but the "
                                 f"ledger recorded {row['params']}; the sampler no longer reproduces this sweep "
                                 "(was optuna upgraded?)", hint="start a new sweep")
        if row["state"] != "done":
            state = _run_trial(ledger, spec, row, total, observer)
            if state == "interrupted":
                return True
            row["objective"] = objective_value(ledger, row["run_id"], spec.objective.metric)
            ledger.finish_sweep_trial(sweep_id, number, row["objective"])
            observer.trial_finished(number, state, row["objective"])
        run_state = ledger.get_run(row["run_id"])["state"]
        if run_state == "succeeded" and row["objective"] is not None and math.isfinite(row["objective"]):
            study.tell(trial, row["objective"])
        else:
            # A rejected or failed trial is never the best; TPE learns nothing from it.
            study.tell(trial, state=TrialState.FAIL)
    return False


def _work(ledger: Ledger, sweep_id: str, spec: SweepSpec, observer: SweepObserver) -> bool:
    """Claim and run trials until none is left to claim. True if a trial was interrupted (Ctrl-C)."""
    total = trial_count(spec)
    fingerprints: dict[int, set[str]] = {}
    while True:
        row = _claim_next(ledger, sweep_id, spec, fingerprints)
        if row is None:
            return False
        state = _run_trial(ledger, spec, row, total, observer)
        if state == "interrupted":
            return True
        objective = objective_value(ledger, row["run_id"], spec.objective.metric)
        ledger.finish_sweep_trial(sweep_id, row["number"], objective)
        observer.trial_finished(row["number"], state, objective)


def _claim_next(ledger: Ledger, sweep_id: str, spec: SweepSpec,
                fingerprints: dict[int, set[str]]) -> dict[str, Any] | None:
    """Claim (compare-and-set) the next trial: a pending one, or one whose worker died. Trials none of
    whose stages another run is training right now go first; a trial that does share one still
    trains it only once, because its run waits on the stage lease and then reuses the output."""
    while True:
        candidates = [row for row in ledger.sweep_trials(sweep_id)
                      if row["state"] == "pending" or (row["state"] == "running" and _abandoned(ledger, row))]
        if not candidates:
            return None
        busy = {lease["fingerprint"] for lease in ledger.stage_leases()}
        candidates.sort(key=lambda r: (bool(_trial_fingerprints(spec, r, fingerprints) & busy), r["number"]))
        for row in candidates:
            if ledger.claim_sweep_trial(sweep_id, row["number"], expect_state=row["state"],
                                        expect_owner=(row["owner_pid"], row["owner_host"])):
                return row
        # every candidate was claimed by another worker in between: look again


def _abandoned(ledger: Ledger, row: dict[str, Any]) -> bool:
    """Whether a `running` trial's worker is gone: its pid on this host, or its run's heartbeat."""
    if row["owner_host"] == HOST and row["owner_pid"] and row["owner_pid"] != os.getpid():
        return not liveness.pid_alive(row["owner_pid"])
    run = ledger.find_run(row["run_id"])
    if run is None:
        return time.time() - (row["claimed_at"] or 0) > liveness.STALE_AFTER_S
    return run["state"] == "interrupted" or (run["state"] == "running"
                                             and liveness.owner_gone(run, time.time()) is not None)


def _trial_fingerprints(spec: SweepSpec, row: dict[str, Any], memo: dict[int, set[str]]) -> set[str]:
    """The fingerprints the trial's stages will have; only a scheduling preference, so a failure to
    compute them (nothing expected) just means no preference."""
    if row["number"] not in memo:
        try:
            from trainpipe.config import load_config
            from trainpipe.engine.fingerprint import stage_fingerprint, upstream_stage

            config = load_config(spec.base, overrides=spec.set + param_overrides(row["params"]))
            found: dict[str, str] = {}
            for name in STAGE_ORDER:
                if config.enabled(name):
                    up = upstream_stage(config, name)
                    found[name] = stage_fingerprint(config, name, found.get(up) if up else None)
            memo[row["number"]] = set(found.values())
        except Exception:  # noqa: BLE001 - a preference, not a requirement
            memo[row["number"]] = set()
    return memo[row["number"]]


def _spawn_workers(ledger: Ledger, sweep_id: str, count: int) -> list[subprocess.Popen]:
    """`trainpipe sweep --worker` processes on this machine, logging to the sweep's output dir."""
    if count <= 0:
        return []
    out_dir = Path(ledger.get_sweep(sweep_id)["spec"]["output_dir"]) / "sweeps" / sweep_id
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for index in range(count):
        log = (out_dir / f"worker-{index + 1}.log").open("ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "sweep", "--worker", sweep_id,
                                       "--db", ledger.url], stdout=log, stderr=subprocess.STDOUT,
                                      env=os.environ.copy()))
        log.close()
    return procs


def _run_trial(ledger: Ledger, spec: SweepSpec, row: dict[str, Any], total: int, observer: SweepObserver) -> str:
    """Start the trial's run, resume it if a killed sweep left it interrupted, or report the state a
    finished one reached before the sweep could record it."""
    run = ledger.find_run(row["run_id"])
    observer.trial_started(row["number"], total, row["params"], row["run_id"], resumed=run is not None)
    if run is None:
        # A sweep started with --force starts its trials so too (each trial's own disk check).
        force = bool(ledger.get_sweep(row["sweep_id"])["spec"].get("force"))
        result = driver.start(spec.base, ledger=ledger, overrides=spec.set + param_overrides(row["params"]),
                              observer=observer, run_id=row["run_id"], force=force)
        return result.state
    run = liveness.reconcile(ledger, [run], time.time())[0]
    if run["state"] == "interrupted":
        return driver.resume(row["run_id"], ledger=ledger, observer=observer).state
    if run["state"] == "running":
        raise RunOwned(f"trial run {row['run_id']} is owned by pid {run['owner_pid']} on {run['owner_host']}")
    return run["state"]
