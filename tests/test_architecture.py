"""The package's floors, read from the source: every import points down a floor (or stays on its own),
no module imports itself back through others, and no module outgrows one reader's attention.

docs/architecture.md draws the same floors; change both together. Imports inside functions count
(they run, only later); imports under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trainpipe"

# Lowest first. A module belongs to the first entry whose prefix names it (or its package).
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("trainpipe.errors", "trainpipe.paths", "trainpipe.versions", "trainpipe.faults",
                    "trainpipe.diskspace", "trainpipe.failures", "trainpipe.checkpoints", "trainpipe.credentials",
                    "trainpipe.humanize", "trainpipe.cpus")),
    ("config and store", ("trainpipe.config", "trainpipe.store")),
    ("stages", ("trainpipe.stages",)),
    ("gates", ("trainpipe.validators",)),
    ("attempt process", ("trainpipe.attempt",)),
    ("engine", ("trainpipe.engine",)),
    ("api", ("trainpipe.api",)),
    ("cli and ui", ("trainpipe.cli", "trainpipe.ui", "trainpipe")),  # `trainpipe` itself: its run/resume are api's
]
ROOT = "trainpipe"

# Plain-data tables that import nothing from trainpipe, read from any floor: which checks make up each
# gate (the config validates check names against it, which would otherwise point up a floor).
DATA_TABLES = {"trainpipe.validators.registry"}

MAX_LINES = 400
# Longer on purpose. The ledger is one class by design (every write, its transaction and its
# transition row in one place; its reads are store/reader.py's).
LONGER = {"trainpipe.store.ledger": 600}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:  # Alembic's scripts, loaded by Alembic
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[ast.stmt]:
    """Import statements, skipping `if TYPE_CHECKING:` blocks."""
    found: list[ast.stmt] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import module` depends on the module; `from module import name` on the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def floor_of(module: str) -> int:
    best = (-1, -1)  # (prefix length, floor)
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != ROOT
            if (module == prefix or below) and len(prefix) > best[0]:
                best = (len(prefix), index)
    assert best[1] >= 0, f"{module} is on no floor: add it to FLOORS in {__file__} and to docs/architecture.md"
    return best[1]


def test_every_import_points_down_a_floor():
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if target in DATA_TABLES:
                continue
            if floor_of(target) > floor_of(module):
                upward.append(f"{module} ({FLOORS[floor_of(module)][0]}) imports {target} "
                              f"({FLOORS[floor_of(target)][0]})")
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def test_data_tables_import_nothing_from_trainpipe():
    graph = import_graph()
    assert all(not graph[table] for table in DATA_TABLES), {table: graph[table] for table in DATA_TABLES}


def test_no_import_circle():
    graph = import_graph()
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not circles, f"import circles: {circles}"


def test_no_module_over_400_lines_except_where_said_why():
    too_long = {}
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > LONGER.get(name, MAX_LINES):
            too_long[name] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_ones():
    """The checks above are only as good as the graph: a lazy import is an edge, a type-only one is not."""
    graph = import_graph()
    # attempt/worker.py imports validators inside main() only.
    assert "trainpipe.validators" in graph["trainpipe.attempt.worker"]
    # validators/registry.py names PipelineConfig for type checkers only.
    assert "trainpipe.config" not in graph["trainpipe.validators.registry"]
