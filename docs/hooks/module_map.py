"""MkDocs hook: the floors of `trainpipe/` and the one-line job of every module, on the architecture page.

`<!-- module-map -->` in docs/architecture.md becomes one table per floor, lowest last, listing each
module with its size and the first sentence of its docstring. The floors are the ones
tests/test_architecture.py enforces (its FLOORS table, loaded from that file), and the jobs are the
modules' own docstrings, so the page cannot drift from the code.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- module-map -->"


def _rules() -> Any:
    spec = importlib.util.spec_from_file_location("_architecture_rules", ROOT / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _job(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text, maxsplit=1)[0]
    return first.replace("|", "\\|") or "(package marker)"


def module_map() -> str:
    rules = _rules()
    modules = rules._modules()
    graph = rules.import_graph()
    by_floor: dict[int, list[str]] = {}
    for name in modules:
        by_floor.setdefault(rules.floor_of(name), []).append(name)
    out = []
    for index in reversed(range(len(rules.FLOORS))):
        title, _ = rules.FLOORS[index]
        below = sorted({rules.FLOORS[rules.floor_of(t)][0] for m in by_floor.get(index, []) for t in graph[m]
                        if rules.floor_of(t) < index and t not in rules.DATA_TABLES})
        out += [f"### {title}", "", f"Imports from: {', '.join(below) if below else 'nothing in trainpipe'}.", "",
                "| module | lines | job |", "|---|---:|---|"]
        for name in sorted(by_floor.get(index, [])):
            path = modules[name]
            lines = len(path.read_text(encoding="utf-8").splitlines())
            out.append(f"| `{path.relative_to(ROOT)}` | {lines} | {_job(path)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, module_map())
