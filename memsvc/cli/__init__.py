"""The `memsvc` command line (typer): `memsvc.cli.commands.app`, with the model-side commands in
`memsvc.cli.model` (knnlm, generate) and `memsvc.cli.longctx` (eval-long, train-gate). The CLI imports
the library (`memsvc`, `lm`, `retrievers`), never the reverse; heavy imports (torch, transformers, FAISS,
SQL) stay inside the commands, so `memsvc --help` starts fast.

A light install (`pip install memsvc[cli]`) runs the commands that talk to a server (`--url`); a command
that needs a part it left out says which extra brings it, in one line (`missing_part`).
"""
from __future__ import annotations

import sys

# The extra that installs each module a light install leaves out (`pip install memsvc` is the client alone).
EXTRA_OF = {
    "typer": "cli", "tqdm": "cli", "pydantic_settings": "cli",
    "torch": "lm", "transformers": "lm", "sentence_transformers": "lm", "gguf": "lm", "accelerate": "lm",
    "matplotlib": "lm",
    "faiss": "server", "fastapi": "server", "uvicorn": "server", "orjson": "server", "sqlalchemy": "server",
    "alembic": "server", "psycopg": "server", "prometheus_client": "server", "pythonjsonlogger": "server",
    "scipy": "server", "snowballstemmer": "server",
    "pymilvus": "milvus", "milvus_lite": "milvus",
}


def missing_part(exc: ModuleNotFoundError) -> str | None:
    """The one-line message for a module this install of memsvc leaves out (None for any other module)."""
    module = (exc.name or "").split(".")[0]
    if module not in EXTRA_OF:
        return None
    return (f"error: this needs {module}, which this install of memsvc leaves out: "
            f"pip install 'memsvc[{EXTRA_OF[module]}]'")


def main() -> None:
    """The `memsvc` console script."""
    try:
        from memsvc.cli.commands import app
    except ModuleNotFoundError as exc:
        message = missing_part(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(2)
    app()
