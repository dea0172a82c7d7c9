"""The shape of the house: the import graph of ``streamdiff`` has no circles and nothing imports ``commands``.

Every module under ``streamdiff/`` is parsed with :mod:`ast` (never imported), and every import statement in it counts:
module level, inside functions and methods, inside ``try``. How an import becomes an edge:

- ``import a.b.c`` and ``from a.b.c import name`` point at the module ``a.b.c`` (its ``__init__.py`` when it is a
  package), and ``from a.b import c`` points at the submodule ``a.b.c`` when there is one, else at ``a.b``.
  Relative imports are resolved against the importing module's package.
- The parent packages that Python runs on the way (``a``, ``a.b``) are not edges: every module would otherwise import
  ``streamdiff/__init__.py``. A package ``__init__`` that imports its own submodules is an ordinary edge, and no
  circle unless a submodule imports the package back (``from . import name`` where ``name`` is not a submodule, or
  ``from streamdiff.engine import X`` inside ``streamdiff/engine/``) -- that is a circle, and this test finds it.
- Imports inside ``if TYPE_CHECKING:`` are left out: they are read by type checkers only and never run. (That leaves
  out type-only circles, e.g. ``engine.engine`` <-> ``engine.stream`` and ``server.hub`` <-> ``server.session``.)
- Dynamic imports (``importlib.import_module``, with which ``streamdiff.cli`` finds the commands) are not seen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import streamdiff

ROOT = Path(streamdiff.__file__).resolve().parent
PACKAGE = "streamdiff"
COMMANDS = f"{PACKAGE}.commands"
# The ``streamdiff`` entry point (``python -m streamdiff``, the console script) sits above the commands it runs.
ENTRY_POINTS = {f"{PACKAGE}.cli", f"{PACKAGE}.__main__"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # of the importing file, relative to the repository
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (in a function)' if self.in_function else ''}"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, ``streamdiff.engine`` -> ``streamdiff/engine/__init__.py``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that runs, with whether it sits inside a function; ``if TYPE_CHECKING:`` bodies skipped."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, in_function))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of ``streamdiff`` that ``name`` (dotted) names, or None for other packages."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path = ROOT) -> list[Edge]:
    modules = module_files(root)
    edges: list[Edge] = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _resolve(base, modules))
            for target in dict.fromkeys(targets):
                if target is not None and target != module:
                    relative = path.relative_to(root.parent).as_posix()
                    edges.append(Edge(module, target, relative, node.lineno, in_function))
    return edges


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _shortest_cycle(start: str, graph: dict[str, set[str]], allowed: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & allowed):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def cycles(edges: list[Edge]) -> list[str]:
    """Each circle as a readable chain, ``a -> b (a.py:3) -> a (b.py:9 (in a function))``; one per module on it."""
    graph: dict[str, set[str]] = {}
    sites: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
        sites.setdefault((edge.source, edge.target), edge)
    chains: dict[tuple[str, ...], str] = {}
    for component in _strongly_connected(graph):
        for start in component:
            path = _shortest_cycle(start, graph, set(component))
            ring = path[:-1]
            turn = ring.index(min(ring))
            key = tuple(ring[turn:] + ring[:turn])
            if key in chains:
                continue
            text = key[0]
            for source, target in zip(key, key[1:] + key[:1]):
                text += f" -> {target} [{sites[(source, target)].where()}]"
            chains[key] = text
    return sorted(chains.values())


def test_the_graph_sees_every_kind_of_import():
    edges = import_graph()
    pairs = {(edge.source, edge.target) for edge in edges}
    assert ("streamdiff.engine", "streamdiff.engine.stream") in pairs  # a package __init__ re-exporting a submodule
    assert ("streamdiff", "streamdiff.config") in pairs  # ``from .config import ...``
    assert any(edge.in_function for edge in edges)  # function-level imports count
    assert ("streamdiff.cli", COMMANDS) in pairs  # ``from . import commands`` is the subpackage


def test_circles_are_reported_as_chains():
    edges = [Edge("p.a", "p.b", "p/a.py", 3, False), Edge("p.b", "p.c", "p/b.py", 5, True),
             Edge("p.c", "p.a", "p/c.py", 7, False), Edge("p.c", "p.d", "p/c.py", 8, False),
             Edge("p.d", "p.d2", "p/d.py", 1, False), Edge("p.d2", "p.d", "p/d2.py", 2, True)]
    assert cycles(edges) == [
        "p.a -> p.b [p/a.py:3] -> p.c [p/b.py:5 (in a function)] -> p.a [p/c.py:7]",
        "p.d -> p.d2 [p/d.py:1] -> p.d [p/d2.py:2 (in a function)]",
    ]
    assert cycles(edges[3:5]) == []


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles (a function-level import hides a circle, it does not remove it):\n" + "\n".join(
        found
    )


def test_nothing_imports_commands():
    offenders = [
        f"{edge.where()} imports {edge.target}"
        for edge in import_graph()
        if edge.target.startswith(COMMANDS)
        and not edge.source.startswith(COMMANDS)
        and edge.source not in ENTRY_POINTS
    ]
    assert not offenders, "only the command line imports streamdiff.commands:\n" + "\n".join(offenders)
