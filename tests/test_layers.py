"""The import rule of docs/ARCHITECTURE.md, read from the source with `ast`: layers from the contract floor
up to the CLI, imports point down (or within a layer) only, no circles, and the floor and the client import
nothing heavy. (The client's `sys.modules` at run time: test_light.py.)"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memsvc", "lm", "retrievers")
FLOOR = "memsvc.contract"
FLOOR_THIRD_PARTY = {"numpy", "pydantic", "orjson"}  # orjson: used when installed, never required

# Bottom to top; a module belongs to the longest prefix listed (the `memsvc` package itself is empty).
LAYERS = [
    ["memsvc.contract"],                                              # the floor: types, checks, wire, errors
    ["memsvc.config", "memsvc.store", "memsvc.db", "retrievers", "lm"],  # engines
    ["memsvc.collections"],                                           # documents: catalog + retrievers + lm
    ["memsvc.service", "memsvc.client", "memsvc.observability"],      # the two faces of Client, server parts
    ["memsvc.api", "memsvc.connect"],                                 # the REST app; picking a face
    ["memsvc.cli"],                                                   # the command line, on top of everything
]
ONLY = {"memsvc.client": {FLOOR}}  # the light client: the floor and nothing else of memsvc
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages (alembic migrations left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "migrations" in parts:
                continue
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = project_modules()


def imported_names(path: Path, type_checking: bool = True) -> set[str]:
    """Every module an import statement of the file names, wherever it stands (inside functions too, and
    under `if TYPE_CHECKING:` unless `type_checking` is False); `from a import b` gives a.b when that is a
    module, else a."""
    tree = ast.parse(path.read_text())
    skipped = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                         else node.module for alias in node.names)
    return names


def project_imports(name: str, type_checking: bool = True) -> set[str]:
    """The project modules `name` imports (a name that is no module counts as its package)."""
    found = set()
    for imported in imported_names(MODULES[name], type_checking):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            found.add(imported)
    return found


def layer(name: str) -> int | None:
    matches = [(len(prefix), n) for n, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_every_module_has_a_layer():
    assert [name for name in MODULES if layer(name) is None] == ["memsvc"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_only(name):
    if layer(name) is None:
        return
    upward = [f"{imported} (layer {layer(imported)})" for imported in sorted(project_imports(name))
              if layer(imported) is not None and layer(imported) > layer(name)]
    assert not upward, f"{name} (layer {layer(name)}) imports {', '.join(upward)}"
    for prefix, allowed in ONLY.items():
        if name == prefix or name.startswith(prefix + "."):
            others = [i for i in project_imports(name) if not any(i == a or i.startswith(a + ".") for a in allowed)]
            assert not others, f"{name} may import only {allowed}, imports {others}"


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """Imports inside functions count (they still tie the modules together); `if TYPE_CHECKING:` ones do not."""
    graph = {name: project_imports(name, type_checking=False) for name in MODULES}
    assert circles(graph) == []


def test_the_floor_imports_nothing_above_it_and_nothing_heavy():
    floor = {name: path for name, path in MODULES.items() if name == FLOOR or name.startswith(FLOOR + ".")}
    assert len(floor) > 5
    for name, path in floor.items():
        for imported in imported_names(path):
            top = imported.split(".")[0]
            if top in PACKAGES:
                assert imported == FLOOR or imported.startswith(FLOOR + "."), f"{name} imports {imported}"
            else:
                assert top in sys.stdlib_module_names or top in FLOOR_THIRD_PARTY, f"{name} imports {imported}"
