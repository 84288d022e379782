"""Screenshots of `trainpipe ui` for docs/ui.md (docs/img/ui-*.png), from a real run.

Trains configs/quickstart.yaml into a fresh ledger, runs a two-trial sweep over dpo.beta on it (SFT
and merge come from the stage cache), starts `trainpipe ui` on that ledger and photographs the runs,
run, compare and sweep pages in Debian's headless chromium (selenium; `apt-get install chromium
chromium-driver`). With --db, an existing ledger is photographed instead and nothing is trained.

    python scripts/ui_screenshots.py [--db sqlite:///PATH] [--out docs/img]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_HEIGHT = 1650


def trainpipe(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "trainpipe.cli.app", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def make_ledger(work: Path, env: dict[str, str]) -> str:
    db = f"sqlite:///{work / 'ledger.db'}"
    trainpipe("run", str(ROOT / "configs" / "quickstart.yaml"), "--set", f"output_dir={work / 'out'}", "--db", db,
              env=env)
    sweep = work / "sweep_beta.yaml"
    sweep.write_text(f"name: quickstart-beta\nbase: {ROOT / 'configs' / 'quickstart.yaml'}\nspace:\n"
                     "  dpo.beta: [0.05, 0.3]\nstrategy: grid\nobjective:\n  metric: dpo.rewards/accuracies\n"
                     "  direction: maximize\n", encoding="utf-8")
    trainpipe("sweep", str(sweep), "--set", f"output_dir={work / 'out'}", "--db", db, env=env)
    return db


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", help="photograph this ledger instead of training a new one")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    work = Path(tempfile.mkdtemp(prefix="tp-ui-shots-"))
    db = args.db or make_ledger(work, env)
    file = db.removeprefix("sqlite:///")
    conn = sqlite3.connect(file)
    run_id = conn.execute("SELECT run_id FROM runs WHERE run_id NOT IN (SELECT run_id FROM sweep_trials) "
                          "ORDER BY created_at DESC").fetchone()[0]
    sweep_id, = conn.execute("SELECT sweep_id FROM sweeps ORDER BY created_at DESC").fetchone()
    trials = [r[0] for r in conn.execute("SELECT run_id FROM sweep_trials WHERE sweep_id = ? ORDER BY number",
                                         (sweep_id,))]
    conn.close()

    server = subprocess.Popen([sys.executable, "-m", "trainpipe.cli.app", "ui", "--db", db, "--port", "0"],
                              stdout=subprocess.PIPE, text=True, env=env)
    base = re.search(r"(http://\S+?:\d+)/", server.stdout.readline()).group(1)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--window-size=1360,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    args.out.mkdir(parents=True, exist_ok=True)
    pages = {"ui-runs.png": ("/", 700), "ui-run.png": (f"/runs/{run_id}", MAX_HEIGHT),
             "ui-compare.png": (f"/compare?run={run_id}&run={trials[-1]}", 1300),
             "ui-sweep.png": (f"/sweeps/{sweep_id}", 1100)}
    try:
        for name, (path, height) in pages.items():
            driver.set_window_size(1360, 900)
            driver.get(base + path)
            time.sleep(1.5)  # uPlot draws after DOMContentLoaded
            full = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1360, min(full, height))
            time.sleep(0.5)
            driver.save_screenshot(str(args.out / name))
            print(f"{args.out / name}: {(args.out / name).stat().st_size / 1024:.0f} KB")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
