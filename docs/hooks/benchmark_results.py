"""MkDocs hook: benchmarks/RESULTS.md (outside docs/, where the benchmarks write it) becomes the site
page `benchmark-results.md` at build time, so the site shows the file itself rather than a copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"
PAGE = "benchmark-results.md"


def on_files(files: Files, config: Any, **_: Any) -> Files:
    files.append(File.generated(config, PAGE, content=RESULTS.read_text(encoding="utf-8")))
    return files
