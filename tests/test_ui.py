"""`trainpipe ui` in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium), against a real ledger: one quickstart run trained while the browser watches it, a
two-trial sweep that reuses its SFT and merge, and a run written through the Ledger class whose
gate output carries a <script>. Without Chromium these tests skip, saying why; under CI=true they
fail instead (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO_ROOT
from helpers import cli, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
XSS = "<script>window.__xss = 1; document.title = 'pwned'</script><img src=x onerror=\"window.__xss=2\">"


def _require_browser() -> None:
    reason = None
    try:
        import selenium  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        reason = f"{exc.name} is not installed: pip install -e '.[dev]'"
    if reason is None and not (CHROMIUM and CHROMEDRIVER):
        reason = "no chromium/chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run does)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the browser tests must run, not skip)")
        pytest.skip(reason)


def _env(home: Path, db: str) -> dict[str, str]:
    env = os.environ.copy()
    env.update(TRAINPIPE_HOME=str(home), TRAINPIPE_DB=db, TRAINPIPE_RETRY_BACKOFF_S="0", TOKENIZERS_PARALLELISM="false")
    env.pop("TRAINPIPE_FAULT", None)
    env.pop("TRAINPIPE_UI_TOKEN", None)
    return env


class Server:
    """`trainpipe ui` as a real process on a free port (--port 0; the port is read from its first line)."""

    def __init__(self, db: str, env: dict[str, str], *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "ui", "--db", db, "--port", "0",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        line = self.line = self.proc.stdout.readline()
        match = re.search(r"at (http://\S+?:(\d+))/", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"ui did not start: {line}{self.proc.stdout.read()}")
        self.url, self.port = match.group(1), int(match.group(2))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _rows(db_file: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db_file)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache):
    """The ledger and a server over it. The quickstart run starts here, in the background: the first
    test watches it live; `finished` waits for it."""
    _require_browser()
    root = tmp_path_factory.mktemp("ui")
    db_file = root / "ledger.db"
    db = f"sqlite:///{db_file}"
    env = _env(root / "home", db)
    env["TRAINPIPE_CACHE"] = str(model_cache)
    log = open(root / "run.log", "w", encoding="utf-8")  # noqa: SIM115 - closed at teardown
    run = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "run", str(QUICKSTART), "--set",
                            f"output_dir={root / 'out'}"], stdout=log, stderr=subprocess.STDOUT, env=env)

    def created():
        try:
            return _rows(db_file, "SELECT run_id FROM runs")
        except sqlite3.Error:
            return None  # the file exists before its tables do

    run_id = wait_for(created, timeout=120, what="the run to be created")[0][0]
    server = Server(db, env)
    state = {"root": root, "db": db, "db_file": db_file, "env": env, "run": run, "run_id": run_id,
             "server": server, "sweep_id": None}
    yield state
    server.stop()
    if run.poll() is None:
        run.kill()
    log.close()


@pytest.fixture(scope="module")
def finished(world):
    """The quickstart run finished, then a two-trial sweep over dpo.beta sharing its SFT and merge
    through the stage cache (only DPO trains), then a run whose gate output holds a <script>."""
    assert world["run"].wait(timeout=600) == 0, (world["root"] / "run.log").read_text(encoding="utf-8")
    sweep_file = world["root"] / "sweep.yaml"
    sweep_file.write_text(f"name: ui-beta\nbase: {QUICKSTART}\nspace:\n  dpo.beta: [0.1, 0.3]\nstrategy: grid\n"
                          "objective:\n  metric: dpo.rewards/accuracies\n  direction: maximize\n", encoding="utf-8")
    proc = cli("sweep", str(sweep_file), "--set", f"output_dir={world['root'] / 'out'}", "--json", env=world["env"])
    assert proc.returncode in (0, 3), proc.stderr
    world["sweep_id"] = _rows(world["db_file"], "SELECT sweep_id FROM sweeps")[0][0]
    _write_xss_run(world)
    return world


def _write_xss_run(world) -> None:
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(world["db"])
    try:
        ledger.create_run(run_id="xss-run", pipeline_id=f"pipe{XSS}", config_snapshot={"note": XSS},
                          config_path=None, output_dir=str(world["root"]), run_dir=str(world["root"] / "xss"),
                          stages=["sft"])
        ledger.record_gate("xss-run", "sft", None, "gate1_sft", False, [
            {"name": "evil_check", "passed": False, "severity": "error", "mode": "sequential",
             "value": XSS, "threshold": 1, "duration_s": 0.1, "details": f"generated: {XSS}"}])
        ledger.update_run("xss-run", error=f"boom {XSS}")
        attempt_id, attempt = ledger.open_attempt("xss-run", "sft")
        ledger.close_attempt(attempt_id, "failed", error=f"attempt said {XSS}")
    finally:
        ledger.close()
    # A model output quoting a <script>, saved by the stage worker's own writer.
    from trainpipe.attempt.worker import _save_generations

    work = world["root"] / "xss" / ".work" / "sft"
    work.mkdir(parents=True)
    _save_generations(work / f"generations-{attempt}.jsonl",
                      [{"check": "evil_check", "prompt": "say hi", "output": XSS, "problem": "not JSON"}])


def _open(browser, url: str) -> None:
    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete", timeout=30,
             what=f"{url} to load")


# ------------------------------------------------------------------ a run in progress

# A whole quickstart takes 15-45 s on an idle 2-core box; on an overloaded one it took 13 min.
@pytest.mark.timeout(1500)
def test_run_page_follows_a_live_run_without_reload(world, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{world['server'].url}/runs/{world['run_id']}")
    first_state = browser.find_element(By.ID, "run-state").text
    assert first_state in ("pending", "running"), f"the run finished before the page opened ({first_state})"
    # A mark on the page's window: a reload would lose it.
    browser.execute_script("window.__same_page = 42")
    seen_progress = set()

    def page_state() -> str:
        # One script reads both: the poll swaps these elements out every 1.5 s.
        state, step = browser.execute_script(
            "const p = document.querySelector('#live-progress progress');"
            "return [document.getElementById('run-state').textContent.trim(), p ? p.value : null]")
        if step is not None:
            seen_progress.add(step)
        return state

    # Watch until the run ends, then give the page a few polls to catch up.
    ended_at = None
    while (state := page_state()) != "succeeded":
        if world["run"].poll() is not None:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 15:
                break
        time.sleep(0.5)
    assert state == "succeeded", f"the page still shows {state} 15 s after the run ended"
    assert browser.execute_script("return window.__same_page") == 42, "the page reloaded"
    assert world["run"].wait(timeout=60) == 0
    ledger_state = _rows(world["db_file"], "SELECT state FROM runs WHERE run_id = ?", world["run_id"])[0][0]
    assert ledger_state == "succeeded"
    # The live progress bar moved while the page was open (step values read from the trainer's events).
    assert len(seen_progress) >= 2, seen_progress
    # The charts were drawn by the polling too: no curves existed when the page opened.
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-area .chart canvas")


# ------------------------------------------------------------------ finished runs

def test_runs_page_lists_every_run_of_the_ledger(finished, browser):
    from selenium.webdriver.common.by import By

    _open(browser, finished["server"].url + "/")
    shown = {row.get_attribute("data-run") for row in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")}
    in_ledger = {r[0] for r in _rows(finished["db_file"], "SELECT run_id FROM runs")}
    assert len(in_ledger) == 4 and shown == in_ledger
    assert browser.find_element(By.ID, "run-count").text == "4"
    # The sweep filter keeps only its trials.
    _open(browser, f"{finished['server'].url}/?sweep={finished['sweep_id']}")
    shown = {row.get_attribute("data-run") for row in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")}
    trials = {r[0] for r in _rows(finished["db_file"], "SELECT run_id FROM sweep_trials")}
    assert shown == trials and len(trials) == 2


def test_run_page_draws_the_loss_chart_and_every_gate_check(finished, browser):
    from selenium.webdriver.common.by import By

    run_id = finished["run_id"]
    _open(browser, f"{finished['server'].url}/runs/{run_id}")
    charts = {c.get_attribute("data-title"): c for c in browser.find_elements(By.CSS_SELECTOR, "#chart-area .chart")}
    sft_steps = _rows(finished["db_file"], "SELECT COUNT(DISTINCT step) FROM metrics WHERE run_id = ? AND stage = 'sft' "
                      "AND name = 'loss'", run_id)[0][0]
    assert sft_steps > 1
    loss = charts["sft · loss"]
    assert loss.find_elements(By.TAG_NAME, "canvas") and int(loss.get_attribute("data-points")) == sft_steps
    assert "dpo · rewards/margins" in charts
    checks = _rows(finished["db_file"], "SELECT g.gate, c.name FROM gate_checks c JOIN gate_results g ON "
                   "c.gate_result_id = g.id WHERE g.run_id = ?", run_id)
    assert len(checks) >= 6
    shown = [(t.get_attribute("data-gate"), r.find_element(By.CSS_SELECTOR, "td").text)
             for t in browser.find_elements(By.CSS_SELECTOR, "table.gate")
             for r in t.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert sorted(shown) == sorted(checks)
    # The outputs gate 3 generated and scored: every held-out and red-team prompt, those a check found
    # a problem in marked: as many as the format check's value and the red-team check's count say.
    eval_rows = len((REPO_ROOT / "examples" / "task_api" / "eval.jsonl").read_text().splitlines())
    redteam_rows = len((REPO_ROOT / "examples" / "task_api" / "redteam.jsonl").read_text().splitlines())
    rows = browser.find_elements(By.CSS_SELECTOR, "details.generations[data-stage=dpo] tbody tr")
    assert len(rows) == eval_rows + redteam_rows

    def check_value(name: str) -> float:
        return float(_rows(finished["db_file"], "SELECT c.value FROM gate_checks c JOIN gate_results g ON "
                           "c.gate_result_id = g.id WHERE g.run_id = ? AND c.name = ?", run_id, name)[0][0])

    marked = [r for r in rows if "bad" in r.get_attribute("class").split()]
    assert len(marked) == round((1 - check_value("output_format_valid")) * eval_rows) + int(check_value("no_harmful_content"))
    # The run's own path through the run machine is drawn: its current state outlined.
    assert browser.find_element(By.CSS_SELECTOR, "svg.fsm .node.current").text == "succeeded"


def _ledger_dump(db_file: Path) -> str:
    """Every row of every table, as SQL text: read through the WAL, where a fresh write lands first
    (the main file's bytes would not show it until a checkpoint)."""
    conn = sqlite3.connect(db_file)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def test_verify_button_rehashes_and_writes_nothing(finished, browser):
    from selenium.webdriver.common.by import By

    db_file = finished["db_file"]
    before = _ledger_dump(db_file)
    _open(browser, f"{finished['server'].url}/runs/{finished['run_id']}")
    browser.find_element(By.ID, "verify-btn").click()
    summary = wait_for(lambda: browser.find_elements(By.ID, "verify-summary"), timeout=60, what="the verify result")[0]
    artifacts = _rows(db_file, "SELECT COUNT(DISTINCT path) FROM artifacts WHERE run_id = ?", finished["run_id"])[0][0]
    assert summary.get_attribute("data-ok") == "true" and f"all {artifacts} artifacts" in summary.text
    assert _ledger_dump(db_file) == before


def test_compare_page_overlays_curves_and_highlights_config_differences(finished, browser):
    from selenium.webdriver.common.by import By

    trial = _rows(finished["db_file"], "SELECT run_id FROM sweep_trials WHERE params LIKE '%0.3%'")[0][0]
    _open(browser, finished["server"].url + "/")
    for run_id in (finished["run_id"], trial):
        browser.find_element(By.CSS_SELECTOR, f"input[name=run][value='{run_id}']").click()
    browser.find_element(By.CSS_SELECTOR, "button.compare").click()
    wait_for(lambda: "/compare" in browser.current_url, timeout=30, what="the compare page")
    differing = {row.find_element(By.TAG_NAME, "td").text: [c.text for c in row.find_elements(By.TAG_NAME, "td")[1:]]
                 for row in browser.find_elements(By.CSS_SELECTOR, "table.config-diff tr.differs")}
    columns = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.config-diff thead th")[1:]]
    assert sorted(columns) == sorted((finished["run_id"], trial))
    assert dict(zip(columns, differing["dpo.beta"])) == {finished["run_id"]: "0.1", trial: "0.3"}
    assert "sft.lora_r" not in differing
    overlay = browser.find_elements(By.CSS_SELECTOR, "#overlay-area .chart")
    assert overlay and all(c.find_elements(By.TAG_NAME, "canvas") for c in overlay)
    assert browser.find_elements(By.CSS_SELECTOR, "table.gate-compare tbody tr td.ok")


def test_sweep_page_shows_the_comparison_and_objective_chart(finished, browser):
    from selenium.webdriver.common.by import By

    sweep_id = finished["sweep_id"]
    _open(browser, f"{finished['server'].url}/sweeps/{sweep_id}")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.sweep tbody tr")
    trials = _rows(finished["db_file"], "SELECT number, run_id FROM sweep_trials WHERE sweep_id = ?", sweep_id)
    assert sorted(int(r.get_attribute("data-trial")) for r in rows) == sorted(t[0] for t in trials)
    objectives = [r[0] for r in _rows(finished["db_file"], "SELECT objective FROM sweep_trials WHERE sweep_id = ? "
                                      "AND objective IS NOT NULL", sweep_id)]
    chart = browser.find_elements(By.CSS_SELECTOR, "#objective-chart .chart")
    assert chart and chart[0].find_elements(By.TAG_NAME, "canvas")
    assert int(chart[0].get_attribute("data-points")) == len(objectives)
    # A trial's SFT came from the cache, and its run page says from where.
    _open(browser, f"{finished['server'].url}/runs/{trials[0][1]}")
    sft = browser.find_element(By.CSS_SELECTOR, "tr.stage[data-stage=sft]")
    assert "reused from run" in sft.text and finished["run_id"] in sft.text


def _trained_in(db_file: Path, run_id: str, stage: str) -> str:
    """The run that trained `run_id`'s `stage`: follow the ledger's cached_from_run links."""
    while True:
        state, source = _rows(db_file, "SELECT state, cached_from_run FROM stages WHERE run_id = ? AND name = ?",
                              run_id, stage)[0]
        if state != "cached":
            return run_id
        run_id = source


def _drawn(browser, chart) -> tuple[list[str], list[list]]:
    """The series labels and data uPlot drew in a chart box (the plot object the page made)."""
    return browser.execute_script("const u = arguments[0].uplot;"
                                  "return [u.series.slice(1).map((s) => s.label), u.data]", chart)


def test_compare_draws_a_cached_stage_with_the_curves_of_the_run_that_trained_it(finished, browser):
    from selenium.webdriver.common.by import By

    db_file, run_id = finished["db_file"], finished["run_id"]
    trial = _rows(db_file, "SELECT run_id FROM sweep_trials WHERE sweep_id = ? ORDER BY number DESC",
                  finished["sweep_id"])[0][0]
    # The trial is a second run that took its SFT from the stage cache: it logged no SFT metric itself.
    assert _rows(db_file, "SELECT state FROM stages WHERE run_id = ? AND name = 'sft'", trial)[0][0] == "cached"
    assert _rows(db_file, "SELECT COUNT(*) FROM metrics WHERE run_id = ? AND stage = 'sft'", trial)[0][0] == 0
    origin = _trained_in(db_file, trial, "sft")
    assert origin == run_id
    loss = {}
    for step, value in _rows(db_file, "SELECT step, value FROM metrics WHERE run_id = ? AND stage = 'sft' "
                             "AND name = 'loss' ORDER BY id", origin):
        loss[step] = value  # a resumed stage logged a step twice: the later value stands
    _open(browser, f"{finished['server'].url}/compare?run={run_id}&run={trial}")
    chart = browser.find_element(By.CSS_SELECTOR, "#overlay-area .chart[data-title='sft loss']")
    labels, data = _drawn(browser, chart)
    assert labels == [run_id, f"{trial} (from the cache: run {origin})"]
    assert f"{trial} (from the cache: run {origin})" in chart.text  # the legend, as shown
    for series in data[1:]:  # both runs' SFT curves: the origin's steps and values, as the ledger has them
        assert {step: value for step, value in zip(data[0], series) if value is not None} == loss
    # The trial's own run page draws it too, titled with where it came from.
    _open(browser, f"{finished['server'].url}/runs/{trial}")
    titled = f"sft · loss (from the cache: run {origin})"
    chart = browser.find_element(By.CSS_SELECTOR, f"#chart-area .chart[data-title='{titled}']")
    _, data = _drawn(browser, chart)
    assert dict(zip(data[0], data[1])) == loss


def test_ledger_content_is_shown_as_text_never_run(finished, browser):
    from selenium.webdriver.common.by import By

    for path in ("/runs/xss-run", "/", "/compare?run=xss-run&run=" + finished["run_id"]):
        _open(browser, finished["server"].url + path)
        assert browser.execute_script("return window.__xss") is None, path
        assert browser.title != "pwned"
        assert XSS in browser.find_element(By.TAG_NAME, "body").text, path
    _open(browser, finished["server"].url + "/runs/xss-run")
    details = browser.find_element(By.CSS_SELECTOR, "table.gate td.details").text
    assert details == f"generated: {XSS}"
    output = browser.execute_script("return document.querySelector('table.generations td.mono.details').textContent")
    assert output == XSS


def test_unknown_run_and_sweep_are_404_pages(finished, browser):
    from selenium.webdriver.common.by import By

    base = finished["server"].url
    for path, what in (("/runs/no-such-run", "run 'no-such-run'"), ("/sweeps/no-such-sweep", "sweep 'no-such-sweep'")):
        assert _status(base + path) == 404
        _open(browser, base + path)
        assert f"There is no {what} in this ledger." in browser.find_element(By.CSS_SELECTOR, ".notfound").text
    # Read-only: anything but GET is refused.
    request = urllib.request.Request(base + "/", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=20)
    assert err.value.code == 405


# ------------------------------------------------------------------ a ledger written without training

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An empty ledger the tests write into through the Ledger class (nothing trains), and a server."""
    _require_browser()
    from trainpipe.store.ledger import Ledger

    root = tmp_path_factory.mktemp("ui-written")
    db_file = root / "ledger.db"
    db = f"sqlite:///{db_file}"
    Ledger(db).close()
    server = Server(db, _env(root / "home", db))
    yield {"root": root, "db": db, "db_file": db_file, "server": server}
    server.stop()


def test_sweep_page_follows_a_running_sweep_without_reload(written, browser):
    from selenium.webdriver.common.by import By

    from trainpipe.store.ledger import Ledger

    db_file = written["db_file"]
    ledger = Ledger(written["db"])

    def start_trial(number: int, beta: float) -> str:
        run_id = f"live-trial-{number}"
        ledger.create_run(run_id=run_id, pipeline_id="quickstart", config_snapshot={"dpo": {"beta": beta}},
                          config_path=None, output_dir=str(written["root"]), run_dir=str(written["root"] / run_id),
                          stages=["sft", "merge", "dpo"])
        ledger.add_sweep_trials("live", [(number, {"dpo.beta": beta}, run_id)])
        return run_id

    def finish_trial(number: int, run_id: str, objective: float) -> None:
        ledger.update_run(run_id, state="succeeded", finished_at=time.time())
        ledger.finish_sweep_trial("live", number, objective)

    def shown() -> dict[int, tuple[str, str]]:
        """Trial number -> (state, objective) as the page's table shows them (one script reads the
        whole table: the poll swaps it out every 1.5 s)."""
        rows = browser.execute_script(
            "return [...document.querySelectorAll('table.sweep tbody tr')].map((r) => [r.dataset.trial,"
            " r.querySelector('td.trial-state').textContent.trim(), r.querySelector('td.objective').textContent])")
        return {int(number): (state, objective) for number, state, objective in rows}

    def best_rows() -> list[str]:
        return browser.execute_script("return [...document.querySelectorAll('table.sweep tr.best')]"
                                      ".map((r) => r.dataset.trial)")

    def in_ledger() -> dict[int, tuple[str, str]]:
        rows = _rows(db_file, "SELECT t.number, r.state, t.objective FROM sweep_trials t JOIN runs r "
                     "ON r.run_id = t.run_id WHERE t.sweep_id = 'live'")
        return {number: (state, "-" if objective is None else f"{objective:.4g}") for number, state, objective in rows}

    try:
        # Owned by this (live) process, so shown running; one trial done before the page opens.
        ledger.create_sweep(sweep_id="live", sweep_file="s.yaml", spec={"output_dir": str(written["root"]), "sweep": {
            "name": "live", "base": str(QUICKSTART), "space": {"dpo.beta": [0.1, 0.2, 0.3]}, "strategy": "grid",
            "objective": {"metric": "dpo.rewards/accuracies", "direction": "maximize"}}})
        finish_trial(0, start_trial(0, 0.1), 0.5)
        _open(browser, f"{written['server'].url}/sweeps/live")
        browser.execute_script("window.__same_page = 7")  # a reload would lose it
        assert shown() == in_ledger() and set(shown()) == {0}
        # A trial that starts after the page loaded appears, with its run's state.
        second = start_trial(1, 0.3)
        wait_for(lambda: shown() == in_ledger() and 1 in shown(), timeout=20, what="trial 1 on the page")
        assert shown()[1][0] == "pending"
        # It finishes better than trial 0 (maximize): its objective, the best row and the chart follow.
        finish_trial(1, second, 0.875)
        wait_for(lambda: shown() == in_ledger() and shown()[1] == ("succeeded", "0.875"), timeout=20,
                 what="trial 1's objective on the page")
        best = max(_rows(db_file, "SELECT objective, number, run_id FROM sweep_trials WHERE sweep_id = 'live'"))
        wait_for(lambda: best_rows() == [str(best[1])], timeout=20, what="the best row to move")
        assert best[2] in browser.execute_script("return document.getElementById('sweep-best').textContent")
        # The chart is drawn anew only when its points change, so it holds still now.
        chart = browser.find_element(By.CSS_SELECTOR, "#objective-chart .chart")
        _, data = _drawn(browser, chart)
        assert sorted(zip(data[0], data[1])) == sorted(_rows(db_file, "SELECT number, objective FROM sweep_trials "
                                                             "WHERE sweep_id = 'live'"))
        # The sweep ends: the page says so and stops polling.
        ledger.set_sweep_state("live", "finished", finished_at=time.time())
        wait_for(lambda: browser.execute_script("return document.getElementById('sweep-state').textContent")
                 == "finished", timeout=20, what="the sweep's end on the page")
        assert browser.execute_script("return window.__same_page") == 7, "the page reloaded"
    finally:
        ledger.close()


def test_held_out_output_flagged_by_the_safety_check_is_marked_first(written, browser):
    """Gate 3's two generation checks, run for real on the quickstart config with a stand-in model
    whose held-out answers are valid JSON, one carrying `rm -rf`; recorded and saved as the stage
    worker does. The ledger's no_harmful_content row flags that held-out output."""
    import json

    from trainpipe.config import load_config
    from trainpipe.stages.data import eval_rows
    from trainpipe.attempt.worker import _save_generations
    from trainpipe.store.ledger import Ledger
    from trainpipe.validators import generation
    from trainpipe.validators.gate import GateContext

    config = load_config(QUICKSTART)
    answers = [generation._split(row)[1] for row in eval_rows(config)]
    harmful = json.dumps({**json.loads(answers[3]), "note": "then run rm -rf / to tidy up"})

    class Model:
        calls = 0

        def system_prompt(self) -> None:
            return None

        def generate(self, conversations):
            Model.calls += 1
            if Model.calls == 1:  # the held-out prompts
                return answers[:3] + [harmful] + answers[4:]
            return ['{"action": "refuse"}'] * len(conversations)  # the red-team prompts

    ctx = GateContext(stage="dpo", output_path=None, metrics={}, log_history=[], config=config, resources=Model())
    checks = []
    for check in (generation.output_format_valid, generation.no_harmful_content):
        outcome = check(ctx)
        ctx.generations += outcome.outputs  # as the gate runner does
        checks.append({"name": check.__name__, "passed": outcome.passed, "severity": "error", "mode": "sequential",
                       "value": outcome.value, "threshold": outcome.threshold, "duration_s": 0.1,
                       "details": outcome.details})
    ledger = Ledger(written["db"])
    run_dir = written["root"] / "harm-run"
    try:
        ledger.create_run(run_id="harm-run", pipeline_id="quickstart", config_snapshot=config.model_dump(mode="json"),
                          config_path=None, output_dir=str(written["root"]), run_dir=str(run_dir), stages=["dpo"])
        attempt_id, attempt = ledger.open_attempt("harm-run", "dpo")
        ledger.record_gate("harm-run", "dpo", attempt_id, "gate3_dpo", False, checks)
        ledger.close_attempt(attempt_id, "failed", error="gate 3 rejected")
    finally:
        ledger.close()
    (run_dir / ".work" / "dpo").mkdir(parents=True)
    _save_generations(run_dir / ".work" / "dpo" / f"generations-{attempt}.jsonl", ctx.generations)

    # What the ledger says: every held-out output well-formed, one output flagged, a held-out one.
    values = dict(_rows(written["db_file"], "SELECT c.name, c.value FROM gate_checks c JOIN gate_results g "
                        "ON c.gate_result_id = g.id WHERE g.run_id = 'harm-run'"))
    details = _rows(written["db_file"], "SELECT details FROM gate_checks WHERE name = 'no_harmful_content' "
                    "ORDER BY id DESC")[0][0]
    flagged = re.search(r"\(matches (.+?), from output_format_valid\)", details)
    assert float(values["output_format_valid"]) == 1.0 and int(float(values["no_harmful_content"])) == 1 and flagged

    _open(browser, f"{written['server'].url}/runs/harm-run")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('details.generations[data-stage=dpo] tbody tr')].map((r) =>"
        " [r.classList.contains('bad'), ...[...r.cells].map((c) => c.textContent)])")
    assert len(rows) == len(answers) + len(generation.redteam_prompts(ctx))
    marked = [r for r in rows if r[0]]
    assert len(marked) == int(float(values["no_harmful_content"])) + round((1 - float(values["output_format_valid"]))
                                                                            * len(answers))
    assert rows[:len(marked)] == marked  # problem outputs first
    _, check, _prompt, output, problem = marked[0]
    assert (check, output) == ("output_format_valid", harmful)
    assert f"matches {flagged.group(1)}" in problem


# ------------------------------------------------------------------ binding and tokens

def test_non_loopback_bind_needs_a_token(world, tmp_path):
    proc = cli("ui", "--db", world["db"], "--host", "0.0.0.0", "--port", "0", timeout=60, env=world["env"])
    assert proc.returncode == 2
    assert "without a token" in proc.stderr and "Traceback" not in proc.stderr


def test_token_is_required_on_every_request(world, browser):
    from selenium.webdriver.common.by import By

    server = Server(world["db"], world["env"], "--host", "0.0.0.0", "--token", "s3cret-token")
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _status(base + "/") == 401
        assert _status(base + "/?token=wrong") == 401
        assert _status(base + "/static/app.js") == 401
        assert _status(base + f"/runs/{world['run_id']}", {"Authorization": "Bearer wrong"}) == 401
        assert _status(base + f"/runs/{world['run_id']}", {"Authorization": "Bearer s3cret-token"}) == 200
        _open(browser, base + "/?token=wrong")
        assert "401" in browser.find_element(By.TAG_NAME, "body").text
        # The right token once in the URL; the cookie it sets carries it to the next page and the fetches.
        _open(browser, base + "/?token=s3cret-token")
        browser.find_element(By.CSS_SELECTOR, f"a[href='/runs/{world['run_id']}']").click()
        wait_for(lambda: browser.find_elements(By.ID, "run-state"), timeout=30, what="the run page behind the token")
    finally:
        server.stop()


def test_startup_line_gives_the_url_but_never_the_token(tmp_path):
    _require_web_extra()
    from trainpipe.store.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(db).close()
    env = _env(tmp_path / "home", db)
    secret = "s3cret-token-9f2"
    for how in (["--token", secret], ["--host", "127.0.0.1"]):
        if how[0] != "--token":
            env["TRAINPIPE_UI_TOKEN"] = secret  # the same, from the environment
        server = Server(db, env, *how)
        try:
            assert _status(server.url + "/") == 401  # the token is in force
            assert _status(f"{server.url}/?token={secret}") == 200
        finally:
            server.stop()
        output = server.line + server.proc.stdout.read()
        assert secret not in output, output
        # The URL, bare, and that every request needs the token.
        assert re.search(rf"at http://127\.0\.0\.1:{server.port}/ ", server.line), server.line
        assert "needs the token" in server.line and "?token=YOUR_TOKEN" in server.line


# ------------------------------------------------------------------ start-up errors (no browser)

def _require_web_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc.name} is not installed (CI=true: the ui tests must run)")
        pytest.skip(f"{exc.name} is not installed: pip install -e '.[dev]'")


def test_ledger_that_cannot_be_opened_is_refused_at_start(tmp_path):
    _require_web_extra()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    proc = cli("ui", "--db", f"sqlite:///{garbage}", "--port", "0", timeout=60)
    assert proc.returncode == 2 and "is not an SQLite database" in proc.stderr and "Traceback" not in proc.stderr
    missing = tmp_path / "nowhere.db"
    proc = cli("ui", "--db", f"sqlite:///{missing}", "--port", "0", timeout=60)
    assert proc.returncode == 2 and f"no ledger at {missing}" in proc.stderr
    assert not missing.exists()


def test_port_in_use_names_the_port(tmp_path):
    _require_web_extra()
    from trainpipe.store.ledger import Ledger

    Ledger(f"sqlite:///{tmp_path / 'ledger.db'}").close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = cli("ui", "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--port", str(port), timeout=60)
    assert proc.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in proc.stderr


# ------------------------------------------------------------------ the query layer, on both backends

def _seed_small(url: str) -> None:
    """Five runs (two in a sweep, one owned by a pid that is gone) through the Ledger class."""
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(url)
    try:
        for index, pipeline in enumerate(["alpha", "alpha", "beta", "beta", "beta"]):
            ledger.create_run(run_id=f"run_{index}-x", pipeline_id=pipeline, config_snapshot={"i": index},
                              config_path=None, output_dir="/tmp", run_dir=f"/tmp/run_{index}", stages=["sft"])
        ledger.create_sweep(sweep_id="sw-1", sweep_file="s.yaml", spec={"output_dir": "/tmp", "sweep": {
            "name": "sw", "base": str(QUICKSTART), "space": {"dpo.beta": [0.1, 0.3]}, "strategy": "grid",
            "objective": {"metric": "dpo.rewards/accuracies", "direction": "maximize"}}})
        ledger.add_sweep_trials("sw-1", [(0, {"dpo.beta": 0.1}, "run_3-x"), (1, {"dpo.beta": 0.3}, "run_4-x")])
        ledger.update_run("run_0-x", state="running", owner_pid=2**22 + 12345, owner_host=socket.gethostname())
    finally:
        ledger.close()


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_run_filters_and_paging_in_the_shared_reader(db_url):
    from trainpipe.engine.report import status_rows
    from trainpipe.store.opening import open_for_reading

    _seed_small(db_url)
    reader = open_for_reading(db_url)
    assert reader.count_runs() == 5 and reader.pipelines() == ["alpha", "beta"]
    assert {r["run_id"] for r in reader.list_runs(limit=None, pipeline="beta")} == {"run_2-x", "run_3-x", "run_4-x"}
    assert {r["run_id"] for r in reader.list_runs(limit=None, sweep="sw-1")} == {"run_3-x", "run_4-x"}
    assert reader.count_runs(sweep="sw-1", pipeline="alpha") == 0
    # LIKE's wildcards in the search are literal: "_" matches only an underscore.
    assert [r["run_id"] for r in reader.list_runs(limit=None, id_contains="n_2")] == ["run_2-x"]
    assert reader.list_runs(limit=None, id_contains="%") == []
    pages = [reader.list_runs(limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 2, 1] and len({r["run_id"] for p in pages for r in p}) == 5
    assert [s["sweep_id"] for s in reader.list_sweeps()] == ["sw-1"] and reader.list_sweeps()[0]["trials"] == 2
    # The dashboard shows a dead owner's run interrupted but records nothing.
    shown = {r["run_id"]: r["state"] for r in status_rows(reader, show_all=True, mark_abandoned=False)}
    assert shown["run_0-x"] == "interrupted"
    assert reader.get_run("run_0-x")["state"] == "running"
    assert len(reader.transitions("run_0-x")) == 1


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_pages_are_served_from_either_backend(db_url):
    _require_web_extra()
    _seed_small(db_url)
    server = Server(db_url, os.environ.copy())
    try:
        for path, code in (("/", 200), ("/?pipeline=beta&q=run_", 200), ("/runs/run_1-x", 200),
                           ("/sweeps", 200), ("/sweeps/sw-1", 200), ("/compare?run=run_1-x&run=run_2-x", 200),
                           ("/fsm", 200), ("/runs/nope", 404), ("/sweeps/nope", 404)):
            assert _status(server.url + path) == code, path
        with urllib.request.urlopen(server.url + "/?pipeline=beta", timeout=20) as response:
            page = response.read().decode()
        assert 'data-run="run_2-x"' in page and 'data-run="run_1-x"' not in page
    finally:
        server.stop()
    from trainpipe.store.ledger import Ledger

    ledger = Ledger(db_url)
    assert ledger.get_run("run_0-x")["state"] == "running"  # served, not marked
    ledger.close()
