"""The compare page: two or more runs side by side (curves overlaid, gate checks, config differences)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from trainpipe.ui.curves import stage_charts

if TYPE_CHECKING:
    from trainpipe.ui.app import Dashboard


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"sft": {"lora_r": 8}} -> {"sft.lora_r": 8}; lists stay whole (a list is one setting)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def compare(board: Dashboard, request: Request) -> Response:
    ids = list(dict.fromkeys(i for i in request.query_params.getlist("run") if i))
    if len(ids) < 2:
        return board.render("compare_pick.html", status_code=400 if ids else 200, given=ids)
    found = [board.report(i) for i in ids]
    missing = [i for i, r in zip(ids, found) if r is None]
    if missing:
        return board.not_found(f"run '{missing[0]}'")
    runs = [r for r in found if r is not None]
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat))
    config_rows = [{"key": k, "cells": [f.get(k) for f in flat],
                    "differs": len({repr(f.get(k)) for f in flat}) > 1} for k in keys]
    gate_rows: dict[tuple[str, str], list[dict[str, Any] | None]] = {}
    for index, run in enumerate(runs):
        for stage in run["stages"]:
            for check in (stage["gate"] or {}).get("checks", []):
                gate_rows.setdefault((stage["name"], check["name"]), [None] * len(runs))[index] = check
    # One chart per stage and metric, one series per run; a stage a run took from the stage cache is
    # drawn from the run that trained it, its label naming that run.
    overlay: dict[str, dict[str, Any]] = {}
    for run in runs:
        for chart in stage_charts(board.ledger, run):
            label = run["run_id"]
            if chart["origin"] is not None:
                label += f" (from the cache: run {chart['origin']})"
            for name, points in chart["curves"].items():
                overlay.setdefault(f"{chart['stage']} {name}", {})[label] = points
    return board.render("compare.html", runs=runs, config_rows=config_rows,
                        differing=sum(r["differs"] for r in config_rows),
                        gate_rows=[{"stage": k[0], "check": k[1], "cells": v} for k, v in gate_rows.items()],
                        overlay=[{"title": t, "series": s} for t, s in overlay.items()])
