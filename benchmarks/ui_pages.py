"""`trainpipe ui` server time per page on a large ledger (issue 20, target: <= 0.3 s per page).

Seeds the ledger benchmarks/cli_startup.py builds (RUNS runs with 3 stages, 3 attempts, 3 gates of
13 checks, checkpoints and artifacts each, TRANSITIONS transitions), adds a 300-step loss curve per
stage to the newest run, starts a real `trainpipe ui` process on it and requests each page over
HTTP. The figure is the server's own time for the page (its `Server-Timing` header: from the request
reaching the app to the response starting), the median of --repeat requests; the round trip seen by
the client is shown next to it, and a static file served by the same process is the same-work
baseline (HTTP, the middleware, no ledger).

    python benchmarks/ui_pages.py [--runs 10000] [--transitions 100000] [--repeat 9] [--db PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_startup import ROOT, seed  # noqa: E402

TARGET_MS = 300.0


def add_curves(db_url: str, run_id: str) -> None:
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(db_url)
    for attempt in ledger.attempts(run_id):
        if attempt["stage"] != "merge":
            ledger.record_metrics(run_id, attempt["stage"], attempt["id"],
                                  [(step, "loss", 1.0 / (1 + step / 50)) for step in range(1, 301)])
    ledger.close()


def fetch(url: str) -> tuple[float, float, int]:
    """(server ms from Server-Timing, round-trip ms, bytes)."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
        timing = response.headers.get("server-timing", "")
    wall = (time.perf_counter() - started) * 1000
    match = re.search(r"dur=([\d.]+)", timing)
    return float(match.group(1)) if match else float("nan"), wall, len(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--db", type=Path, help="keep the seeded ledger here (reused if it exists)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tp-ui-bench-"))
    db_file = args.db or work / "ledger.db"
    db_url = f"sqlite:///{db_file}"
    newest = f"quickstart-bench-{args.runs - 1:06d}"
    if not db_file.exists():
        newest = seed(db_url, args.runs, args.transitions, work)
        add_curves(db_url, newest)
    other = f"quickstart-bench-{args.runs - 2:06d}"

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "ui", "--db", db_url, "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = server.stdout.readline()
    base = re.search(r"(http://\S+?:\d+)/", line).group(1)
    pages = {
        "static file (baseline)": "/static/app.css",
        "runs (page 1 of 100)": "/",
        "runs, page 50": "/?page=50",
        "runs, id search": "/?q=bench-0099",
        "runs, state filter": "/?state=failed",
        "runs fragment (polled)": "/fragments/runs?",
        "run": f"/runs/{newest}",
        "run fragment (polled)": f"/fragments/runs/{newest}?part=top",
        "run curves JSON (polled)": f"/api/runs/{newest}/curves",
        "compare 2 runs": f"/compare?run={newest}&run={other}",
        "state machines": "/fsm",
    }
    rows = []
    try:
        for label, path in pages.items():
            fetch(base + path)  # warm: templates compiled, caches filled
            samples = [fetch(base + path) for _ in range(args.repeat)]
            server_ms = [s[0] for s in samples]
            wall_ms = [s[1] for s in samples]
            rows.append((label, statistics.median(server_ms), max(server_ms), statistics.median(wall_ms),
                         samples[0][2]))
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"\n{args.runs:,} runs, {args.transitions:,} transitions; median of {args.repeat} requests each\n")
    print("| page | server median | server max | round trip median | bytes | target |")
    print("|---|---|---|---|---|---|")
    for label, median, high, wall, size in rows:
        verdict = "-" if "baseline" in label else ("met" if median <= TARGET_MS else "NOT met")
        print(f"| {label} | {median:.1f} ms | {high:.1f} ms | {wall:.1f} ms | {size:,} | <= {TARGET_MS:.0f} ms: {verdict} |")


if __name__ == "__main__":
    main()
