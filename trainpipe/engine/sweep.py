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

import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainpipe.config import STAGE_ORDER
from trainpipe.engine import cache, liveness, preflight, runner
from trainpipe.engine.runner import Observer
from trainpipe.errors import (
    EXIT_GATE_REJECTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    IllegalTransition,
    RunOwned,
    TrainpipeError,
)
from trainpipe.paths import check_run_id
from trainpipe.stages.base import write_json_atomic
from trainpipe.store.ledger import HOST, Ledger, StaleState
from trainpipe.sweepfile import Range, SweepSpec, load_sweep, param_overrides, trial_count


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
          observer: SweepObserver | None = None) -> SweepResult:
    """Validate the sweep file (and the base config, its datasets and the preflight), then create the
    sweep and run its trials. Bad input raises ConfigError before anything is written."""
    spec, config = load_sweep(sweep_file, extra_sets=extra_sets)
    runner.validate_inputs(config)
    preflight.check(config, ledger)
    sweep_id = check_run_id(new_sweep_id(spec.name or f"{config.pipeline_id}-sweep"))
    ledger.create_sweep(sweep_id=sweep_id, sweep_file=str(Path(sweep_file).resolve()),
                        spec={"sweep": spec.model_dump(mode="json"), "output_dir": config.output_dir})
    return _drive(ledger, sweep_id, observer or SweepObserver())


def resume(sweep_id: str, *, ledger: Ledger, observer: SweepObserver | None = None) -> SweepResult:
    """Keep the finished trials, resume an interrupted one, start the rest."""
    sweep = reconcile(ledger, ledger.get_sweep(sweep_id))
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
    return _drive(ledger, sweep_id, observer or SweepObserver())


def reconcile(ledger: Ledger, sweep: dict[str, Any]) -> dict[str, Any]:
    """A `running` sweep whose owner died on this host is `interrupted` (compare-and-set)."""
    if sweep["state"] == "running" and sweep["owner_host"] == HOST and sweep["owner_pid"] \
            and not liveness.pid_alive(sweep["owner_pid"]):
        try:
            ledger.set_sweep_state(sweep["sweep_id"], "interrupted", expect_state="running")
        except StaleState:
            pass
        return ledger.get_sweep(sweep["sweep_id"])
    return sweep


def _spec(sweep: dict[str, Any]) -> SweepSpec:
    return SweepSpec.model_validate(sweep["spec"]["sweep"])


def _distributions(spec: SweepSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, values in spec.space.items():
        if isinstance(values, Range):
            if values.is_int:
                out[key] = IntDistribution(int(values.low), int(values.high), log=values.log,
                                           step=int(values.step or 1))
            else:
                out[key] = FloatDistribution(float(values.low), float(values.high), log=values.log,
                                             step=values.step)
        else:
            out[key] = CategoricalDistribution(values)
    return out


def _study(spec: SweepSpec):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.strategy == "grid":
        class _Grid(optuna.samplers.GridSampler):
            # GridSampler.after_trial calls study.stop() once the grid is exhausted, which raises
            # RuntimeError outside study.optimize(); ask-and-tell stops by itself after the last point.
            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                pass

        sampler = _Grid({k: v for k, v in spec.space.items()}, seed=spec.seed)
    elif spec.strategy == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        # TPE samples at random until it has n_startup_trials results (10 by default): with a small
        # budget, model the space after half of it instead.
        startup = max(1, min(10, trial_count(spec) // 2))
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
    return optuna.create_study(direction=spec.objective.direction, sampler=sampler)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            if not (isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isclose(x, y, rel_tol=1e-12)):
                return False
        elif x != y:
            return False
    return True


def _drive(ledger: Ledger, sweep_id: str, observer: SweepObserver) -> SweepResult:
    from optuna.trial import TrialState

    sweep = ledger.get_sweep(sweep_id)
    spec = _spec(sweep)
    distributions = _distributions(spec)
    study = _study(spec)
    total = trial_count(spec)
    recorded = {row["number"]: row for row in ledger.sweep_trials(sweep_id)}
    observer.sweep_created(sweep_id, total)
    for number in range(total):
        trial = study.ask(distributions)
        row = recorded.get(number)
        if row is None:
            row = {"number": number, "params": dict(trial.params), "run_id": f"{sweep_id}-t{number:03d}",
                   "state": "running", "objective": None}
            ledger.add_sweep_trial(sweep_id, number, row["params"], row["run_id"])
        elif not _same(trial.params, row["params"]):
            raise TrainpipeError(f"sweep {sweep_id}: replaying trial {number} proposed {trial.params}, but the "
                                 f"ledger recorded {row['params']}; the sampler no longer reproduces this sweep "
                                 "(was optuna upgraded?)", hint="start a new sweep")
        if row["state"] != "done":
            state = _run_trial(ledger, spec, row, total, observer)
            if state == "interrupted":
                ledger.set_sweep_state(sweep_id, "interrupted")
                return SweepResult(sweep_id, "interrupted", EXIT_INTERRUPTED, report(ledger, sweep_id))
            row["objective"] = objective_value(ledger, row["run_id"], spec.objective.metric)
            ledger.finish_sweep_trial(sweep_id, number, row["objective"])
            observer.trial_finished(number, state, row["objective"])
        run_state = ledger.get_run(row["run_id"])["state"]
        if run_state == "succeeded" and row["objective"] is not None and math.isfinite(row["objective"]):
            study.tell(trial, row["objective"])
        else:
            # A rejected or failed trial is never the best; TPE learns nothing from it.
            study.tell(trial, state=TrialState.FAIL)
    summary = report(ledger, sweep_id)
    best = summary["best"]
    ledger.set_sweep_state(sweep_id, "finished", best_trial=best["number"] if best else None)
    summary = write_outputs(ledger, sweep_id)
    if best:
        code = EXIT_OK
    elif any(r["state"] == "rejected" for r in summary["trials"]):
        code = EXIT_GATE_REJECTED
    else:
        code = EXIT_STAGE_FAILED
    return SweepResult(sweep_id, "finished", code, summary)


def _run_trial(ledger: Ledger, spec: SweepSpec, row: dict[str, Any], total: int, observer: SweepObserver) -> str:
    """Start the trial's run, resume it if a killed sweep left it interrupted, or report the state a
    finished one reached before the sweep could record it."""
    run = ledger.find_run(row["run_id"])
    observer.trial_started(row["number"], total, row["params"], row["run_id"], resumed=run is not None)
    if run is None:
        result = runner.start(spec.base, ledger=ledger, overrides=spec.set + param_overrides(row["params"]),
                              observer=observer, run_id=row["run_id"])
        return result.state
    run = liveness.reconcile(ledger, [run], time.time())[0]
    if run["state"] == "interrupted":
        return runner.resume(row["run_id"], ledger=ledger, observer=observer).state
    if run["state"] == "running":
        raise RunOwned(f"trial run {row['run_id']} is owned by pid {run['owner_pid']} on {run['owner_host']}")
    return run["state"]


def objective_value(ledger: Ledger, run_id: str, metric: str) -> float | None:
    """The trial's objective: a stage metric (a cached stage's comes from the run that trained it) or a
    gate check's value. None when the run did not get that far."""
    kind, _, name = metric.partition(".")
    value: Any = None
    if kind == "gate":
        for gate in reversed(ledger.gates(run_id)):
            check = next((c for c in gate["checks"] if c["name"] == name), None)
            if check is not None:
                value = check["value"]
                break
    else:
        stage = next((s for s in ledger.stages(run_id) if s["name"] == kind), None)
        if stage is not None and stage["state"] in ("passed", "cached", "rejected"):
            run_dir = ledger.get_run(run_id)["run_dir"]
            value = cache.origin_metrics(ledger, run_id, kind, run_dir)[0].get(name)
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def report(ledger: Ledger, sweep_id: str) -> dict[str, Any]:
    """The comparison: one row per trial (params, each gate's state, objective, wall time, which stages
    trained), the best eligible trial, and how many stage trainings the sweep ran."""
    sweep = reconcile(ledger, ledger.get_sweep(sweep_id))
    spec = _spec(sweep)
    rows = []
    trainings = {name: 0 for name in STAGE_ORDER}
    for trial in ledger.sweep_trials(sweep_id):
        run = ledger.find_run(trial["run_id"])
        stages = {s["name"]: s for s in ledger.stages(trial["run_id"])} if run else {}
        trained = sorted({a["stage"] for a in ledger.attempts(trial["run_id"])}, key=STAGE_ORDER.index) if run else []
        for name in trained:
            trainings[name] += 1
        finished = run and run["finished_at"]
        rows.append({
            "number": trial["number"],
            "run_id": trial["run_id"],
            "params": trial["params"],
            "state": run["state"] if run else "not started",
            "gates": {name: _gate_state(stages.get(name)) for name in STAGE_ORDER},
            "trained": trained,
            "objective": trial["objective"],
            "wall_s": round(run["finished_at"] - run["created_at"], 1) if finished else None,
            "eligible": bool(run and run["state"] == "succeeded" and trial["objective"] is not None
                             and math.isfinite(trial["objective"])),
        })
    eligible = [r for r in rows if r["eligible"]]
    sign = 1 if spec.objective.direction == "maximize" else -1
    best = max(eligible, key=lambda r: (sign * r["objective"], -r["number"])) if eligible else None
    for row in rows:
        row["best"] = best is not None and row["number"] == best["number"]
    out_dir = Path(sweep["spec"]["output_dir"]) / "sweeps" / sweep_id
    return {
        "sweep_id": sweep_id,
        "state": sweep["state"],
        "sweep_file": sweep["sweep_file"],
        "base": spec.base,
        "strategy": spec.strategy,
        "objective": spec.objective.model_dump(),
        "space": list(spec.space),
        "trials_planned": trial_count(spec),
        "trials": rows,
        "best": best,
        "stage_trainings": trainings,
        "naive_stage_trainings": {name: sum(1 for r in rows if r["gates"][name] != "skipped")
                                  for name in STAGE_ORDER},
        "created_at": sweep["created_at"],
        "finished_at": sweep["finished_at"],
        "wall_s": round((sweep["finished_at"] or time.time()) - sweep["created_at"], 1),
        "outputs": {"dir": str(out_dir), "results": str(out_dir / "results.json"),
                    "table": str(out_dir / "comparison.md"),
                    "best_config": str(out_dir / "best_config.yaml") if best else None},
    }


def _gate_state(stage: dict[str, Any] | None) -> str:
    """A stage's gate as the table shows it: passed, cached (passed in the run it came from), rejected..."""
    if stage is None:
        return "-"
    return {"pending": "-", "running": "running", "validating": "running"}.get(stage["state"], stage["state"])


def write_outputs(ledger: Ledger, sweep_id: str) -> dict[str, Any]:
    """results.json, comparison.md, the best trial's config as runnable YAML, and a plot of the
    objective per trial where matplotlib is installed."""
    import yaml

    summary = report(ledger, sweep_id)
    out_dir = Path(summary["outputs"]["dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", summary)
    (out_dir / "comparison.md").write_text(markdown_table(summary), encoding="utf-8")
    best = summary["best"]
    if best:
        snapshot = ledger.get_run(best["run_id"])["config_snapshot"]
        header = (f"# Best trial of sweep {sweep_id}: trial {best['number']} (run {best['run_id']}),\n"
                  f"# {summary['objective']['metric']} = {best['objective']:.6g} ({summary['objective']['direction']}),"
                  f" params {json.dumps(best['params'])}.\n"
                  f"# Paths are absolute. Run it with: trainpipe run {out_dir / 'best_config.yaml'}\n")
        (out_dir / "best_config.yaml").write_text(header + yaml.safe_dump(snapshot, sort_keys=False), encoding="utf-8")
    _plot(summary, out_dir / "objective.png")
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    keys = summary["space"]
    head = ["trial", *keys, *[f"gate {s}" for s in STAGE_ORDER], "trained", summary["objective"]["metric"],
            "wall s", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["trials"]:
        cells = [f"{row['number']}{' (best)' if row['best'] else ''}", *[str(row["params"].get(k)) for k in keys],
                 *[row["gates"][s] for s in STAGE_ORDER], ",".join(row["trained"]) or "-",
                 "-" if row["objective"] is None else f"{row['objective']:.4g}",
                 "-" if row["wall_s"] is None else str(row["wall_s"]), row["run_id"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: the table and results.json carry the same figures
    rows = [r for r in summary["trials"] if r["objective"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter([r["number"] for r in rows], [r["objective"] for r in rows],
               c=["tab:green" if r["eligible"] else "tab:red" for r in rows])
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["objective"]["metric"])
    ax.set_title(f"sweep {summary['sweep_id']} (red: not eligible)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
