"""The import rule of docs/ARCHITECTURE.md, read from the source with `ast`: the contract floor imports
nothing above it and nothing heavy."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memsvc", "lm", "retrievers")
FLOOR = "memsvc.contract"
FLOOR_THIRD_PARTY = {"numpy", "pydantic", "orjson"}  # orjson: used when installed, never required


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


def imported_names(path: Path) -> set[str]:
    """Every module an import statement of the file names, wherever it stands (inside functions and
    `if TYPE_CHECKING:` too); `from a import b` gives a.b when that is a module, else a."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                         else node.module for alias in node.names)
    return names


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
