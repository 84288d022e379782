"""MkDocs hook: the run and stage state machines on the architecture page, generated at build time.

`<!-- fsm-diagram -->` in docs/architecture.md becomes, per machine, the drawing `trainpipe ui` shows
(trainpipe/ui/fsm.py: an inline SVG made from engine/machine.py's transition tables; no JavaScript,
no CDN) and the Mermaid text that `trainpipe inspect --graph --json` prints, run as a command. Both
come from the tables the code enforces, so the page cannot drift from them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- fsm-diagram -->"
TITLES = {"run": "Run states", "stage": "Stage states"}


def _trainpipe_command() -> list[str]:
    """The `trainpipe` next to this interpreter (the venv's), else the CLI module run by it."""
    beside = Path(sys.executable).with_name("trainpipe")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("trainpipe")
    return [found] if found else [sys.executable, "-m", "trainpipe.cli.app"]


def inspect_graph() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([*_trainpipe_command(), "inspect", "--graph", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`trainpipe inspect --graph --json` failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def diagrams() -> str:
    from trainpipe.ui import fsm

    graphs = inspect_graph()
    out = []
    for kind in ("run", "stage"):
        out += [f"### {TITLES[kind]}", "", f'<figure class="fsm-figure">{fsm.svg(kind)}</figure>', "",
                f"`trainpipe inspect --graph` ({kind}):", "", "```text", graphs[kind].strip(), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return markdown.replace(MARKER, diagrams()) if MARKER in markdown else markdown
