"""Which extra brings each part a light install of memsvc leaves out, and the one line that says so.

`pip install memsvc` is the client alone; `memsvc[cli]` adds the command line, `memsvc[lm]` the model side,
`memsvc[server]` the server and the embedded store (pyproject.toml). Imports nothing but the standard library,
so the CLI can say it even when typer is missing.
"""
from __future__ import annotations

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
