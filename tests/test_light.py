"""The light install: `import memsvc.client` loads no FAISS, SQL, torch, scipy, FastAPI or transformers, and
the client and the CLI's `--url` commands work in an interpreter where every part a light install leaves
out cannot be imported (`pip install memsvc` is the client; `memsvc[cli]` adds the command line). A
command that needs a missing part says which extra brings it, in one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest

from memsvc.cli.extras import EXTRA_OF

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("faiss", "sqlalchemy", "torch", "scipy", "fastapi", "transformers")
CLI_PARTS = {module for module, extra in EXTRA_OF.items() if extra == "cli"}

# Put in front of the import system: the modules of `left_out` cannot be imported, as in a light install.
BLOCKER = """
import sys
LEFT_OUT = set({left_out!r})

class LightInstall:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in LEFT_OUT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, LightInstall())
"""


def run_light(code: str, *args: str, with_cli: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter without the parts a light install (with or without the cli extra)
    leaves out."""
    left_out = {module for module, extra in EXTRA_OF.items() if extra != "cli" or not with_cli}
    return subprocess.run([sys.executable, "-c", BLOCKER.format(left_out=sorted(left_out)) + code, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_importing_the_client_loads_nothing_heavy():
    probe = ("import sys, memsvc.client; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_client_works_without_the_parts_it_leaves_out(server):
    code = f"""
import numpy as np
from memsvc.client import MemoryClient
from memsvc.contract import NotFound, InvalidInput

with MemoryClient({server.url!r}) as c:
    mem = c.create_memory("light", dim=4, value_kind="token")
    ids = mem.add(np.eye(4, dtype=np.float32), values=[5, 6, 7, 8], payloads=[{{"n": i}} for i in range(4)],
                  partition="p")
    res = mem.search(np.array([[0, 0, 0.9, 0.1]], dtype=np.float32), k=2)
    mem.set_metadata({{"lam": 0.25}})
    stats = mem.stats()
    try:
        c.collection("nope")
    except NotFound as exc:
        missing = exc.field
    try:
        mem.add(np.full((1, 4), np.nan, dtype=np.float32))
    except InvalidInput as exc:
        bad = exc.field
    print(ids.tolist(), res.ids.tolist(), res.values.tolist(), res.payloads, stats.count,
          [p.name for p in stats.partitions], c.memory("light").spec.metadata, c.list_collections(), missing, bad)
"""
    done = run_light(code, with_cli=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("[0, 1, 2, 3] [[2, 3]] [[7, 8]] [[{'n': 2}, {'n': 3}]] 4 ['p'] {'lam': 0.25} [] "
                                   "name keys")


CLI = "from memsvc.cli import main; main()"


def test_cli_url_commands_work_and_the_rest_name_their_extra(server, tmp_path):
    missing = run_light(CLI, "search", "x", "--collection", "nope", "--url", server.url, "--json")
    assert (missing.returncode, missing.stderr.strip()) == (2, "error: collection 'nope' not found")
    no_file = run_light(CLI, "ingest", "/nonexistent", "--collection", "nope", "--url", server.url)
    assert (no_file.returncode, no_file.stderr.strip()) == (2, "error: /nonexistent: no such file or directory")
    assert "nope" not in httpx.get(f"{server.url}/v1/collections").json()["collections"]  # nothing half-made
    for args, extra in ((["serve"], "server"),
                        (["search", "x", "--collection", "c", "--data-dir", str(tmp_path)], "server"),
                        (["knnlm", "eval", str(ROOT / "README.md"), "--memory", "m", "--url", server.url], "lm")):
        done = run_light(CLI, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert re.fullmatch(rf"error: this needs \w+, which this install of memsvc leaves out: "
                            rf"pip install 'memsvc\[{extra}\]'", lines[0]), lines[0]
    assert not (tmp_path / "memories").exists()  # nothing was made before the message
    bare = run_light(CLI, "--help", with_cli=False)
    assert bare.returncode == 2 and bare.stderr.strip().endswith("pip install 'memsvc[cli]'")


def expanded_extras() -> dict[str, set[str]]:
    """Each extra of pyproject.toml -> the distributions it installs (extras of memsvc itself followed)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        out = set()
        for requirement in extras[extra]:
            if (inner := re.fullmatch(r"memsvc\[(.+)\]", requirement)) is not None:
                out |= {name for part in inner[1].split(",") for name in names(part)}
            else:
                out.add(re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower().replace("_", "-"))
        return out

    return {extra: names(extra) for extra in extras}


@pytest.mark.parametrize("module", sorted(EXTRA_OF))
def test_the_extra_named_for_a_missing_module_installs_it(module):
    extras = expanded_extras()
    installed = {d.lower().replace("_", "-") for d in packages_distributions().get(module, [])}
    assert installed, f"{module} is not installed here"
    assert installed & (extras[EXTRA_OF[module]] | extras["gpu"]), (module, installed)  # gpu: faiss-gpu-cu12


def test_the_base_install_is_the_client():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(re.match(r"[\w-]+", d)[0] for d in project["dependencies"]) == ["httpx", "numpy", "pydantic"]
    assert json.dumps(project["scripts"]) == '{"memsvc": "memsvc.cli:main"}'
