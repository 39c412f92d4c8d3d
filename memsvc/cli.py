"""The `memsvc` command line (typer). Keep heavy imports (torch, transformers) inside the commands."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from memsvc.config import Settings

app = typer.Typer(help="memsvc: retrieval-augmented long-context memory for transformer LMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main() -> None:
    """memsvc: retrieval-augmented long-context memory for transformer LMs."""


@app.command()
def serve(host: Annotated[str, typer.Option(envvar="MEMSVC_HOST", help="interface to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(envvar="MEMSVC_PORT", help="port")] = 8000,
          data_dir: Annotated[Path, typer.Option(envvar="MEMSVC_DATA_DIR", help="memories and catalog")]
          = Path("memsvc-data")) -> None:
    """Serve the REST API (docs at /docs); other MEMSVC_* environment variables set the rest."""
    import uvicorn

    from memsvc.api.app import create_app

    settings = Settings(host=host, port=port, data_dir=data_dir)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


def _register_model_commands() -> None:
    """The model-side commands live with their code in `lm`; their modules import torch lazily."""
    from lm.cli import generate, knnlm_app
    from lm.cli_long import eval_long, train_gate

    app.add_typer(knnlm_app, name="knnlm")
    app.command()(generate)
    app.command("eval-long")(eval_long)
    app.command("train-gate")(train_gate)


_register_model_commands()

if __name__ == "__main__":
    app()
