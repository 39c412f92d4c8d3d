"""lm's import direction: every module imports only modules below it (lazy imports included), so no circles."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top; each module may import only the ones before it.
ORDER = ["lm.rope", "lm.cache_specs", "lm.model_source", "lm.knn_params", "lm.knn_config", "lm.sessions", "lm.devices", "lm.model", "lm.gate", "lm.policies.base", "lm.policies.window", "lm.policies.selective",
         "lm.policies.ranked", "lm.policies.merging", "lm.policies.registry", "lm.policies", "lm.cache",
         "lm.generate", "lm.memory_attention", "lm.blocks", "lm.attention", "lm.longeval", "lm.gate_training", "lm.knnlm",
         "lm.rag", "lm.hf"]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def lm_imports(path: Path) -> set[str]:
    """Every lm module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {n for n in found if n == "lm" or n.startswith("lm.")}


def test_every_lm_module_has_its_place():
    modules = {module_name(p) for p in (ROOT / "lm").rglob("*.py")} - {"lm"}
    assert modules == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_lm_imports_point_down(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    below = set(ORDER[:ORDER.index(module)])
    assert lm_imports(path) <= below, f"{module} imports {sorted(lm_imports(path) - below)} from above it"
