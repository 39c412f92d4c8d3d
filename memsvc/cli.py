"""The `memsvc` command line (typer). Keep heavy imports (torch, transformers) inside the commands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="memsvc: retrieval-augmented long-context memory for transformer LMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main() -> None:
    """memsvc: retrieval-augmented long-context memory for transformer LMs."""


@app.command()
def serve(host: Annotated[str | None, typer.Option(help="interface to listen on [default: 127.0.0.1]")] = None,
          port: Annotated[int | None, typer.Option(help="port [default: 8000]")] = None,
          data_dir: Annotated[Path | None, typer.Option(help="memories and catalog [default: ./memsvc-data]")] = None,
          ) -> None:
    """Serve the REST API (docs at /docs); MEMSVC_* environment variables set the rest."""
    import uvicorn

    from memsvc.api.app import create_app
    from memsvc.config import Settings

    given = {"host": host, "port": port, "data_dir": data_dir}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    app()
