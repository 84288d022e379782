"""What the CLI suggests once a command is done: the commands that look at the demo's run (its ledger
is its own, under the demo's workdir), and where the demo's runs are when `status` finds none."""

from __future__ import annotations

import shlex
from pathlib import Path

from trainpipe.cli.render import Renderer

DEMO_WORKDIR = Path("trainpipe-demo")


def after_demo(renderer: Renderer, db: str, run_id: str) -> None:
    """The next commands, exactly as they work from here (the demo's ledger named)."""
    if renderer.json_mode:
        return
    where = f"--db {shlex.quote(db)}"
    renderer.out.print("Next, with the demo's ledger:", markup=False)
    for command in (f"trainpipe status {where}", f"trainpipe inspect {run_id} {where}", f"trainpipe ui {where}"):
        renderer.out.print(f"  {command}", markup=False, soft_wrap=True, highlight=False)


def demo_ledger_hint(renderer: Renderer) -> None:
    """`status` found no runs in its ledger, and a demo ledger sits in this directory."""
    demo = DEMO_WORKDIR / "ledger.db"
    if renderer.json_mode or not demo.is_file():
        return
    renderer.out.print(f"The demo's runs are in its own ledger: trainpipe status --db "
                       f"{shlex.quote('sqlite:///' + str(demo.resolve()))}", markup=False, soft_wrap=True)
