"""vtc's own import graph has no cycle, counting imports inside functions and the package __init__ files an import
runs: the registry is filled by the classes it lists, never imports them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (top level or inside a function)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target in modules:
                    # Importing a.b.c first runs the packages a and a.b (their __init__), unless the importer is
                    # inside them (then they are already being imported).
                    parts = target.split(".")
                    for depth in range(1, len(parts) + 1):
                        imported = ".".join(parts[:depth])
                        if imported in modules and not (name == imported or name.startswith(imported + ".")):
                            graph[name].add(imported)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_vtc_has_no_import_cycle():
    graph = import_graph(ROOT / "vtc")
    assert "vtc.registry" in graph and "vtc.adapters.base" in graph
    assert cycles(graph) == [], "\n".join(" -> ".join(cycle) for cycle in cycles(graph))


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from pkg import a\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_cycle_check_counts_the_package_an_import_runs(tmp_path):
    """pkg.a imports pkg.sub.x, which runs pkg/sub/__init__.py, which imports pkg.a: a cycle."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.x import thing\n")
    (package / "sub" / "__init__.py").write_text("from pkg import a\n")
    (package / "sub" / "x.py").write_text("thing = 1\n")
    assert ["pkg.a", "pkg.sub", "pkg.a"] in cycles(import_graph(package))
