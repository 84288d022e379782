"""A sweep's comparison: each trial's params, gates, objective and wall time, the best eligible trial,
how many stage trainings the sweep ran; and the files it leaves (results.json, comparison.md, the best
trial's config as runnable YAML, objective.png). Read by `sweep`, `inspect --sweep` and the web UI."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from trainpipe.config import STAGE_ORDER
from trainpipe.config.sweepfile import SweepSpec, trial_count
from trainpipe.engine import cache, liveness
from trainpipe.stages.base import write_json_atomic
from trainpipe.store.ledger import HOST, Ledger, StaleState
from trainpipe.store.reader import LedgerReader


def _owner_dead(sweep: dict[str, Any]) -> bool:
    return bool(sweep["state"] == "running" and sweep["owner_host"] == HOST and sweep["owner_pid"]
                and not liveness.pid_alive(sweep["owner_pid"]))


def reconcile(ledger: Ledger, sweep: dict[str, Any]) -> dict[str, Any]:
    """A `running` sweep whose owner died on this host is `interrupted` (compare-and-set)."""
    if _owner_dead(sweep):
        try:
            ledger.set_sweep_state(sweep["sweep_id"], "interrupted", expect_state="running")
        except StaleState:
            pass
        return ledger.get_sweep(sweep["sweep_id"])
    return sweep


def sweep_spec(sweep: dict[str, Any]) -> SweepSpec:
    return SweepSpec.model_validate(sweep["spec"]["sweep"])


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


def report(ledger: LedgerReader, sweep_id: str, *, mark_abandoned: bool = True) -> dict[str, Any]:
    """The comparison: one row per trial (params, each gate's state, objective, wall time, which stages
    trained), the best eligible trial, and how many stage trainings the sweep ran. Without
    `mark_abandoned` (the read-only web UI) a dead owner's sweep is shown interrupted, not recorded so."""
    sweep = ledger.get_sweep(sweep_id)
    if mark_abandoned:
        sweep = reconcile(ledger, sweep)  # type: ignore[arg-type]
    elif _owner_dead(sweep):
        sweep = {**sweep, "state": "interrupted"}
    spec = sweep_spec(sweep)
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
