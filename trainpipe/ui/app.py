"""`trainpipe ui`: a read-only web dashboard over the ledger (Starlette, Jinja2, vendored uPlot).

Every page is assembled from the same read models as the CLI (engine/report.py, engine/sweep.py,
engine/verify.py) through the same reader (store/reader.py), so the numbers match `status` and
`inspect`. Nothing here writes: a run whose owner died is shown interrupted but not recorded so
(that is `status`'s job), and the verify button only re-hashes.

Escaping: Jinja2 autoescapes every value put into HTML; data for the charts travels as JSON inside
`<script type="application/json">` (Jinja's `tojson` escapes `<`, `>` and `&`), and the page's own
script is a static file, so the Content-Security-Policy forbids inline script outright.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any
from functools import partial
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from trainpipe import humanize
from trainpipe.engine import report as reports
from trainpipe.engine.machine import RunState, mermaid
from trainpipe.errors import RunNotFound, TrainpipeError
from trainpipe.store.reader import LedgerReader
from trainpipe.ui import compare, fsm, sweeps
from trainpipe.ui.curves import stage_charts
from trainpipe.ui.outputs import mark_harmful

HERE = Path(__file__).parent
PAGE_SIZE = 100
TOKEN_COOKIE = "trainpipe_ui_token"
# Inline styles are allowed (uPlot and the timeline position elements with them); inline script is not.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
LIVE_STATES = {"pending", "running"}
PIPELINES_TTL_S = 30.0


def _yaml(value: Any) -> str:
    import yaml

    return yaml.dump(value, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=humanize.when, duration=humanize.duration, short=humanize.short, yaml=_yaml)
    return env


class Dashboard:
    """The pages. One reader, opened (and so validated) at start-up, serves every request: the
    stdlib-sqlite3 one opens a connection per query (WAL: a reader never blocks a writer), the
    SQLAlchemy one pools connections."""

    def __init__(self, ledger: LedgerReader, *, db_label: str):
        self.ledger = ledger
        self.db_label = db_label
        self.env = _environment()
        self._pipelines: tuple[float, list[str]] = (0.0, [])

    def pipelines(self) -> list[str]:
        """For the filter's drop-down, kept for PIPELINES_TTL_S: SELECT DISTINCT reads the whole runs
        table (no index on pipeline_id), ~60 ms of every runs page at 10,000 runs."""
        fetched, names = self._pipelines
        if time.monotonic() - fetched > PIPELINES_TTL_S:
            names = self.ledger.pipelines()
            self._pipelines = (time.monotonic(), names)
        return names

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(db=self.db_label, **context)
        return HTMLResponse(html, status_code=status_code)

    def not_found(self, what: str) -> HTMLResponse:
        return self.render("404.html", status_code=404, what=what)

    # ------------------------------------------------------------ runs

    def _run_query(self, request: Request) -> dict[str, Any]:
        params = request.query_params
        state = params.get("state") or None
        return {"states": [state] if state else None, "pipeline": params.get("pipeline") or None,
                "sweep": params.get("sweep") or None, "id_contains": params.get("q") or None}

    def _runs_table(self, request: Request) -> dict[str, Any]:
        filters = self._run_query(request)
        total = self.ledger.count_runs(**filters)
        pages = max(1, -(-total // PAGE_SIZE))
        try:
            page = min(max(1, int(request.query_params.get("page", "1"))), pages)
        except ValueError:
            page = 1
        rows = reports.status_rows(self.ledger, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE,
                                   mark_abandoned=False, **filters)
        kept = {k: v for k, v in request.query_params.items() if k in ("state", "pipeline", "sweep", "q") and v}
        return {"rows": rows, "total": total, "page": page, "pages": pages,
                "prev_url": "?" + urlencode({**kept, "page": page - 1}) if page > 1 else None,
                "next_url": "?" + urlencode({**kept, "page": page + 1}) if page < pages else None}

    def runs(self, request: Request) -> Response:
        return self.render("runs.html", **self._runs_table(request), filters=request.query_params,
                           query=str(request.query_params),
                           states=[s.value for s in RunState], pipelines=self.pipelines(),
                           sweeps=[s["sweep_id"] for s in self.ledger.list_sweeps()])

    def runs_fragment(self, request: Request) -> Response:
        return self.render("_runs_rows.html", **self._runs_table(request))

    # ------------------------------------------------------------ one run

    def report(self, run_id: str) -> dict[str, Any] | None:
        try:
            return reports.run_report(self.ledger, run_id, mark_abandoned=False)
        except (RunNotFound, TrainpipeError):
            return None

    def _live_context(self, report: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        start = report["created_at"]
        end = report["finished_at"] or (now if report["state"] in LIVE_STATES else None)
        attempts = [a for s in report["stages"] for a in s["attempt_history"]]
        if end is None:
            end = max([a["finished_at"] or a["started_at"] for a in attempts] + [start + 1])
        span = max(end - start, 1e-6)
        bars = {}
        for stage in report["stages"]:
            bars[stage["name"]] = [{
                **a, "left": max(0.0, (a["started_at"] - start) / span * 100),
                "width": max(0.6, ((a["finished_at"] or now) - a["started_at"]) / span * 100)}
                for a in stage["attempt_history"]]
        progress = None
        running = next((s for s in report["stages"] if s["state"] == "running" and s["attempt_history"]), None)
        if running is not None and report["run_dir"]:
            progress = reports.live_progress(report["run_dir"], running["name"],
                                             running["attempt_history"][-1]["attempt"])
            if progress is not None:
                progress["stage"] = running["name"]
        generations = {}
        for s in report["stages"]:
            if s["gate"] and report["run_dir"]:
                saved = reports.gate_generations(report["run_dir"], s["name"], [a["attempt"] for a in s["attempt_history"]])
                generations[s["name"]] = mark_harmful(saved, s["gate"], report["config"])
        walked_run = [(t["from_state"], t["to_state"]) for t in report["transitions"] if t["stage"] is None]
        walked_stage = [(t["from_state"], t["to_state"]) for t in report["transitions"] if t["stage"] is not None]
        return {"r": report, "bars": bars, "progress": progress, "generations": generations, "live": report["state"] in LIVE_STATES,
                "run_svg": fsm.svg("run", walked_run, report["state"]),
                "stage_svg": fsm.svg("stage", walked_stage)}

    def run(self, request: Request) -> Response:
        report = self.report(request.path_params["run_id"])
        if report is None:
            return self.not_found(f"run '{request.path_params['run_id']}'")
        return self.render("run.html", **self._live_context(report),
                           charts=stage_charts(self.ledger, report),
                           mermaid={"run": mermaid("run"), "stage": mermaid("stage")})

    def run_fragment(self, request: Request) -> Response:
        report = self.report(request.path_params["run_id"])
        if report is None:
            return self.not_found(f"run '{request.path_params['run_id']}'")
        part = "_run_bottom.html" if request.query_params.get("part") == "bottom" else "_run_top.html"
        return self.render(part, **self._live_context(report))

    def run_curves(self, request: Request) -> Response:
        report = self.report(request.path_params["run_id"])
        if report is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse({"state": report["state"], "charts": stage_charts(self.ledger, report)})

    def verify(self, request: Request) -> Response:
        from trainpipe.engine.verify import verify_run

        try:
            result = verify_run(self.ledger, request.path_params["run_id"])
        except (RunNotFound, TrainpipeError):
            return self.not_found(f"run '{request.path_params['run_id']}'")
        return self.render("_verify.html", v=result)

    def machines(self, request: Request) -> Response:
        return self.render("fsm.html", run_svg=fsm.svg("run"), stage_svg=fsm.svg("stage"),
                           mermaid={"run": mermaid("run"), "stage": mermaid("stage")})


class Guard:
    """Security for every request: GET/HEAD only, the token when one is set, and the headers that keep
    ledger content inert. The token may come as `?token=` (then kept in an HttpOnly cookie, so links and
    the page's own fetches carry it), as a cookie, or as `Authorization: Bearer`."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    def _allowed(self, scope: Scope) -> tuple[bool, bool]:
        """(authorised, came from the query string)."""
        if not self.token:
            return True, False
        request = Request(scope)
        offered = [(request.query_params.get("token"), True), (request.cookies.get(TOKEN_COOKIE), False)]
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append((auth[7:].strip(), False))
        for value, from_query in offered:
            if value and hmac.compare_digest(value.encode(), self.token.encode()):
                return True, from_query
        return False, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            response: Response = PlainTextResponse("read-only: only GET is served\n", status_code=405,
                                                   headers={"Allow": "GET, HEAD"})
            return await response(scope, receive, send)
        authorised, from_query = self._allowed(scope)
        if not authorised:
            response = PlainTextResponse("401: this dashboard needs its token: open it with ?token=TOKEN "
                                         "(the one given to `trainpipe ui --token`)\n", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)

        started = time.perf_counter()

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                # The page's server time (benchmarks/ui_pages.py reads it; so do browser dev tools).
                headers.append((b"server-timing", f"app;dur={(time.perf_counter() - started) * 1000:.1f}".encode()))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if from_query and self.token:
                    headers.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                                   "Path=/".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(ledger: LedgerReader, *, token: str | None = None, db_label: str = "") -> ASGIApp:
    board = Dashboard(ledger, db_label=db_label)
    routes = [
        Route("/", board.runs),
        Route("/fragments/runs", board.runs_fragment),
        Route("/runs/{run_id}", board.run),
        Route("/fragments/runs/{run_id}", board.run_fragment),
        Route("/api/runs/{run_id}/curves", board.run_curves),
        Route("/runs/{run_id}/verify", board.verify),
        Route("/compare", partial(compare.compare, board)),
        Route("/sweeps", partial(sweeps.sweeps, board)),
        Route("/sweeps/{sweep_id}", partial(sweeps.sweep, board)),
        Route("/api/sweeps/{sweep_id}", partial(sweeps.sweep_data, board)),
        Route("/fsm", board.machines),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def missing(request: Request, exc: Exception) -> Response:
        return board.not_found(f"page '{request.url.path}'")

    app = Starlette(routes=routes, exception_handlers={404: missing})
    return Guard(app, token)
