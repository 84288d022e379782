"""The outputs a gate generated and scored, as the run page lists them.

The stage worker saves them with the problem the check that generated them found (a held-out output
that is not a JSON object; a red-team output that matches the blocklist). `no_harmful_content` also
scans the held-out outputs generated before it in the same gate, and counts a hit among them in its
value and details, but it is another check's row in the saved file and carries no problem there. So
where the ledger says that check flagged something, the held-out outputs are scanned again with the
run's own blocklist (its config snapshot: the patterns, case-insensitive, that the check used) and
a hit is marked like any other problem."""

from __future__ import annotations

import re
from typing import Any

HARMFUL = "no_harmful_content"


def _blocklist(config: dict[str, Any] | None) -> list[re.Pattern[str]]:
    from trainpipe.config import DEFAULT_BLOCKLIST

    validation = (config or {}).get("validation") or {}
    patterns = validation.get("blocklist")
    out = []
    for pattern in DEFAULT_BLOCKLIST if patterns is None else patterns:
        try:
            out.append(re.compile(pattern, re.IGNORECASE))
        except (re.error, TypeError):
            continue  # the config refused such a pattern when the run started; an old snapshot may hold one
    return out


def mark_harmful(rows: list[dict[str, Any]], gate: dict[str, Any] | None,
                 config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """`rows` with each output the gate's failed no_harmful_content check flagged carrying its problem,
    problem rows first (in their saved order otherwise)."""
    check = next((c for c in (gate or {}).get("checks", []) if c["name"] == HARMFUL), None)
    if not rows or check is None or check["passed"]:
        return rows
    patterns = _blocklist(config)
    marked = []
    for row in rows:
        if row.get("check") != HARMFUL and isinstance(row.get("output"), str):
            hit = next((p.pattern for p in patterns if p.search(row["output"])), None)
            if hit:
                found = f"matches {hit!r} ({HARMFUL})"
                row = {**row, "problem": f"{row['problem']}; {found}" if row.get("problem") else found}
        marked.append(row)
    return sorted(marked, key=lambda row: not row.get("problem"))
