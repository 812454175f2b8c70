"""Dependencies point one way: no import cycle between modules or packages, and `diloco/`
never imports `islands/` (DESIGN.md, "Layers").

The graph is read from the sources with `ast`: every import a module runs (at its top or
inside a function, as registries do to stay light) is an edge. Imports under
`if TYPE_CHECKING:` are not: they only name types for annotations and never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("diloco", "islands")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (TYPE_CHECKING blocks skipped)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(source: str, name: str, modules: set[str]) -> set[str]:
    """The project modules `name` imports (a `from pkg import sub` of a submodule counts as
    importing the submodule)."""
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def project_graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    modules = {module_name(path) for path in files}
    return {
        module_name(path): imports_of(path.read_text(), module_name(path), modules)
        for path in files
    }


def package_of(module: str, graph: Mapping[str, set[str]]) -> str:
    """A package is itself; a module belongs to its parent package."""
    is_package = any(other.startswith(module + ".") for other in graph)
    return module if is_package else module.rpartition(".")[0] or module


def package_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Edges between packages: a package importing its own submodules is not an edge, nor is
    a submodule importing modules of a package that contains it (a parent's leaf module)."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = package_of(module, graph)
        edges = packages.setdefault(source, set())
        for target in targets:
            destination = package_of(target, graph)
            inside = destination.startswith(source + ".") or source.startswith(destination + ".")
            if destination != source and not inside:
                edges.add(destination)
    return packages


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# --- the rules, on the project -------------------------------------------------------------


def test_no_module_imports_cycle() -> None:
    found = cycles(project_graph())
    assert not found, f"import cycles between modules: {found}"


def test_no_package_imports_cycle() -> None:
    found = cycles(package_graph(project_graph()))
    assert not found, f"import cycles between packages: {found}"


def test_the_library_never_imports_the_runtime() -> None:
    graph = project_graph()
    offending = {
        module: sorted(t for t in targets if t.startswith("islands"))
        for module, targets in graph.items()
        if module.startswith("diloco")
    }
    assert not {m: t for m, t in offending.items() if t}, offending


def test_leaf_modules_import_nothing_above_them() -> None:
    """The leaves that outer/ and transports/ share import neither of them."""
    graph = project_graph()
    for leaf in ("diloco.shared_state", "diloco.aggregate", "diloco.errors"):
        upper = ("diloco.outer", "diloco.transports")
        above = sorted(target for target in graph[leaf] if target.startswith(upper))
        assert not above, f"{leaf} imports {above}"


# --- the checker itself, on synthetic graphs and sources ------------------------------------


def test_a_cycle_is_found_in_a_synthetic_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_cycle_through_packages_is_found() -> None:
    graph = {
        "p": set(),
        "p.x": {"q.y"},
        "q": set(),
        "q.y": {"p.z"},
        "p.z": set(),
    }
    assert cycles(graph) == []  # no module cycle ...
    assert cycles(package_graph(graph)) == [["p", "q"]]  # ... but p -> q -> p


def test_function_level_imports_count_and_type_checking_ones_do_not() -> None:
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.c import C\n"
        "def build():\n"
        "    from pkg import b\n"
        "    return b\n"
    )
    assert imports_of(source, "pkg.a", modules) == {"pkg", "pkg.b"}


def test_introducing_a_cycle_into_the_project_is_caught() -> None:
    """Add one edge back from a leaf to a module that imports it: the checker sees the cycle."""
    graph = project_graph()
    assert "diloco.shared_state" in graph["diloco.outer.sync"]
    graph["diloco.shared_state"] = graph["diloco.shared_state"] | {"diloco.outer.sync"}
    assert any("diloco.shared_state" in component for component in cycles(graph))
