"""The run and stage state machines as inline SVG, drawn on the server from engine/machine.py's tables.

Why not Mermaid in the browser: its smallest single-file build (@mermaid-js/tiny 11.17) is 2.5 MB of
JavaScript, for two diagrams of at most eight states. A layered drawing of the tables themselves is
a few dozen lines, needs no script at all, and cannot drift from what the code enforces. The
Mermaid text (`trainpipe inspect --graph`) stays one click away on the page for anyone who wants it.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.sax.saxutils import escape

from trainpipe.engine.machine import _TABLES

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 112, 30, 92, 26, 20


def _edges(kind: str) -> list[tuple[str, str, str]]:
    _, table = _TABLES[kind]
    edges = []
    for row in table:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        edges += [(source, row["dest"], row["trigger"]) for source in sources]
    return edges


def _layers(kind: str) -> tuple[dict[str, int], set[tuple[str, str]]]:
    """Each state's column (the longest path to it from the first state, once the ways back are set
    aside) and the ways back: edges into a state already on the depth-first path (retry, resume)."""
    states, _ = _TABLES[kind]
    edges = _edges(kind)
    back: set[tuple[str, str]] = set()
    on_path: list[str] = []
    done: set[str] = set()

    def visit(state: str) -> None:
        on_path.append(state)
        for source, dest, _ in edges:
            if source != state:
                continue
            if dest in on_path:
                back.add((source, dest))
            elif dest not in done:
                visit(dest)
        on_path.pop()
        done.add(state)

    visit(states[0])
    depth = {state: 0 for state in states}
    for _ in states:  # relax: at most len(states) rounds on a DAG
        for source, dest, _ in edges:
            if (source, dest) not in back:
                depth[dest] = max(depth[dest], depth[source] + 1)
    return depth, back


def svg(kind: str, walked: Iterable[tuple[str | None, str]] = (), current: str | None = None) -> str:
    """The `kind` ("run" or "stage") machine; the edges in `walked` ((from, to) pairs, e.g. from the
    ledger's transitions) and the `current` state are highlighted."""
    states, _ = _TABLES[kind]
    walked = {(a, b) for a, b in walked}
    depth, back_edges = _layers(kind)
    columns: dict[int, list[str]] = {}
    for state in states:
        columns.setdefault(depth[state], []).append(state)
    tallest = max(len(c) for c in columns.values())
    edges = _edges(kind)
    # Edges that skip a column run above the boxes, ways back below them: neither crosses a box.
    long_edges = [(a, b) for a, b, _ in edges if (a, b) not in back_edges and depth[b] - depth[a] > 1]
    top_pad = PAD + 14 * len(long_edges)
    height = top_pad + PAD + tallest * NODE_H + (tallest - 1) * ROW_GAP + 14 * (len(back_edges) + 1)
    width = PAD * 2 + len(columns) * NODE_W + (len(columns) - 1) * COL_GAP
    pos: dict[str, tuple[float, float]] = {}
    for col, names in columns.items():
        block = len(names) * NODE_H + (len(names) - 1) * ROW_GAP
        top = top_pad + (tallest * NODE_H + (tallest - 1) * ROW_GAP - block) / 2
        for row, name in enumerate(names):
            pos[name] = (PAD + col * (NODE_W + COL_GAP), top + row * (NODE_H + ROW_GAP))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="fsm" role="img" aria-label="{kind} state machine" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             '<defs><marker id="arrow-{0}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker>'
             '<marker id="arrow-{0}-hot" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#d9480f"/></marker></defs>'
             .format(kind)]
    back = over = 0
    bottom = max(y for _, y in pos.values()) + NODE_H
    for source, dest, trigger in edges:
        (sx, sy), (dx, dy) = pos[source], pos[dest]
        hot = (source, dest) in walked
        cls = "edge hot" if hot else "edge"
        marker = f"url(#arrow-{kind}{'-hot' if hot else ''})"
        if (source, dest) in long_edges:
            over += 1
            x1, y1 = sx + NODE_W, sy + NODE_H / 2
            right, left = x1 + 10 + 6 * over, dx - 10 - 6 * over
            high = top_pad - 6 - 13 * (over - 1)
            path = (f"M{x1:.0f},{y1:.0f} H{right:.0f} V{high:.0f} H{left:.0f} V{dy + NODE_H / 2:.0f} "
                    f"H{dx:.0f}")
            lx, ly = (right + left) / 2, high - 3
        elif (source, dest) not in back_edges:
            x1, y1, x2, y2 = sx + NODE_W, sy + NODE_H / 2, dx, dy + NODE_H / 2
            mid = (x1 + x2) / 2
            path = f"M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
            lx, ly = mid, (y1 + y2) / 2 - 3
        else:
            # Through the gaps between columns, each a little lower than the last.
            back += 1
            left_of_source, left_of_dest = sx - 10 - 6 * back, dx - 10 - 6 * back
            low = bottom + 4 + 13 * back
            path = (f"M{sx:.0f},{sy + NODE_H / 2:.0f} H{left_of_source:.0f} V{low:.0f} H{left_of_dest:.0f} "
                    f"V{dy + NODE_H / 2:.0f} H{dx:.0f}")
            lx, ly = (left_of_source + left_of_dest) / 2, low - 3
        parts.append(f'<path class="{cls}" d="{path}" marker-end="{marker}"/>')
        parts.append(f'<text class="{cls}-label" x="{lx:.0f}" y="{ly:.0f}" text-anchor="middle">{escape(trigger)}</text>')
    visited = {b for _, b in walked} | {a for a, _ in walked if a}
    for state in states:
        x, y = pos[state]
        cls = "node" + (" visited" if state in visited else "") + (" current" if state == current else "")
        parts.append(f'<g class="{cls}"><rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="7"/>'
                     f'<text x="{x + NODE_W / 2:.0f}" y="{y + NODE_H / 2 + 4:.0f}" text-anchor="middle">'
                     f'{escape(state)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
