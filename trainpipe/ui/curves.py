"""The curves a page draws for a run, stage by stage. A stage the run took from the stage cache
logged nothing in this run: its curves are those of the run that trained it (the cache's origin,
following reuse of reuse, as `inspect` names it), and say so."""

from __future__ import annotations

from typing import Any

from trainpipe.engine import report as reports
from trainpipe.store.reader import LedgerReader


def stage_charts(ledger: LedgerReader, report: dict[str, Any]) -> list[dict[str, Any]]:
    """[{"stage", "curves": {metric: [[step, value], ...]}, "origin": run id or None}] for every stage
    with curves; `origin` is the run that trained a cached stage, None for a stage trained here."""
    charts = []
    for stage in report["stages"]:
        curves, origin = stage["curves"], None
        cached = stage["cached_from"] or {}
        trained_in = cached.get("trained_in")
        if not curves and trained_in and trained_in != report["run_id"]:
            origin = trained_in
            # The origin's own curves, as its run page draws them (a resumed stage: the last attempt's values).
            curves = reports.metric_curves(ledger.metrics(trained_in, stage["name"])).get(stage["name"], {})
        if curves:
            charts.append({"stage": stage["name"], "curves": curves, "origin": origin})
    return charts
