"""The `memsvc` command line (typer): `memsvc.cli.commands.app`, with the model-side commands in
`memsvc.cli.model` (knnlm, generate) and `memsvc.cli.longctx` (eval-long, train-gate). The CLI imports
the library (`memsvc`, `lm`, `retrievers`), never the reverse; heavy imports (torch, transformers, FAISS,
SQL) stay inside the commands, so `memsvc --help` starts fast.

A light install (`pip install memsvc[cli]`) runs the commands that talk to a server (`--url`); a command
that needs a part it left out says which extra brings it, in one line (`memsvc.cli.extras`).
"""
from __future__ import annotations

import sys

from memsvc.cli.extras import missing_part


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
