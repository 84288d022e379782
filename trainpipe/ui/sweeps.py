"""The sweep pages: the list, and one sweep's comparison, which follows a running sweep live (its
page polls /api/sweeps/{id}: new trials, their states and objectives, the best trial, the chart)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from trainpipe.errors import RunNotFound

if TYPE_CHECKING:
    from trainpipe.ui.app import Dashboard


def sweeps(board: Dashboard, request: Request) -> Response:
    return board.render("sweeps.html", sweeps=board.ledger.list_sweeps())


def _context(board: Dashboard, sweep_id: str) -> dict[str, Any] | None:
    from trainpipe.engine.sweep_report import report as sweep_report

    try:
        summary = sweep_report(board.ledger, sweep_id, mark_abandoned=False)
    except RunNotFound:
        return None
    best_config = None
    if summary["best"]:
        best_run = board.ledger.find_run(summary["best"]["run_id"])
        best_config = best_run["config_snapshot"] if best_run else None
    points = [[t["number"], t["objective"], t["eligible"]] for t in summary["trials"] if t["objective"] is not None]
    return {"s": summary, "best_config": best_config, "points": points, "live": summary["state"] == "running"}


def sweep(board: Dashboard, request: Request) -> Response:
    sweep_id = request.path_params["sweep_id"]
    context = _context(board, sweep_id)
    if context is None:
        return board.not_found(f"sweep '{sweep_id}'")
    return board.render("sweep.html", **context)


def sweep_data(board: Dashboard, request: Request) -> Response:
    """What the sweep page's poll swaps in: the head and table, the best trial (both rendered and
    escaped here, by the same templates as the page), and the chart's points."""
    context = _context(board, request.path_params["sweep_id"])
    if context is None:
        return JSONResponse({"error": "no such sweep"}, status_code=404)
    html = {part: board.env.get_template(f"_sweep_{part}.html").render(db=board.db_label, **context)
            for part in ("top", "best")}
    return JSONResponse({"state": context["s"]["state"], "metric": context["s"]["objective"]["metric"],
                         "points": context["points"], "html": html})
