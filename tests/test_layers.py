"""The import graph of segcore, search, pipelines and cluster has no circles, and its layers import
only downward: segcore imports neither search nor pipelines, and those two never import each other.

The graph is read with ``ast``, so nothing is imported. Every import counts, at module level or
inside a function (a lazy import is still a dependency), as does ``importlib.import_module("name")``
with a literal name. ``from pkg import name`` points at ``pkg/name.py`` when that module exists,
else at ``pkg/__init__.py``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segcore", "search", "pipelines", "cluster")
# importer package -> packages it must never import
FORBIDDEN = {
    "segcore": ("search", "pipelines"),
    "search": ("pipelines",),
    "pipelines": ("search",),
}

Edge = tuple[str, str]  # (importer module, imported module)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the four packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _targets(module: str, node: ast.AST, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name) pairs of one import node, restricted to our modules."""
    found: list[tuple[str, str]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = _known(alias.name, modules)
            if target:
                found.append((target, alias.name))
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, modules[module].name == "__init__.py", node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            target = sub if sub in modules else _known(base, modules)
            if target:
                found.append((target, alias.name))
    elif isinstance(node, ast.Call) and _is_import_module(node):
        target = _known(node.args[0].value, modules)
        if target:
            found.append((target, node.args[0].value))
    return found


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return (
        name == "import_module"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def import_graph(root: Path = ROOT) -> dict[Edge, set[str]]:
    """Every import edge between our modules, with the names each edge imports."""
    modules = module_files(root)
    edges: dict[Edge, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target, name in _targets(module, node, modules):
                if target != module:
                    edges[(module, target)].add(name)
    return dict(edges)


def circles(edges: dict[Edge, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(groups)


def _file(module: str, modules: dict[str, Path], root: Path) -> str:
    return str(modules[module].relative_to(root))


def describe_circles(edges: dict[Edge, set[str]], root: Path = ROOT) -> list[str]:
    """One paragraph per circle: its files and, per import inside it, the names imported."""
    modules = module_files(root)
    text = []
    for group in circles(edges):
        members = set(group)
        lines = [f"circle of {len(group)} files: " + ", ".join(_file(m, modules, root) for m in group)]
        for (a, b), names in sorted(edges.items()):
            if a in members and b in members:
                lines.append(f"  {_file(a, modules, root)} -> {_file(b, modules, root)} ({', '.join(sorted(names))})")
        text.append("\n".join(lines))
    return text


def one_way_breaches(edges: dict[Edge, set[str]], root: Path = ROOT) -> list[str]:
    """Imports against the one-way rule, one line each."""
    modules = module_files(root)
    bad = []
    for (a, b), names in sorted(edges.items()):
        if b.split(".")[0] in FORBIDDEN.get(a.split(".")[0], ()):
            bad.append(f"{_file(a, modules, root)} -> {_file(b, modules, root)} ({', '.join(sorted(names))})")
    return bad


def test_graph_is_read():
    """The reader sees real edges, lazy ones included (a guard against a silently empty graph)."""
    edges = import_graph()
    assert len(edges) > 100
    assert ("search.runner", "search.spec") in edges or ("search.runner", "search") in edges


def test_no_import_circles():
    found = describe_circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(found)


def test_layers_import_one_way():
    bad = one_way_breaches(import_graph())
    assert not bad, (
        "segcore imports neither search nor pipelines, and those two never import each other:\n"
        + "\n".join(bad)
    )
