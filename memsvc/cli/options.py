"""What the commands share: where the memories are (`--url` or `--data-dir`), the server's key, the model,
and one way to report a user's error or a missing part (`cli_errors`). Typer option aliases end in `Option` where a bare name
would shadow a domain class (`MemoryOption`, `WindowOption`, `ApiKeyOption`)."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from memsvc.cli.extras import missing_part
from memsvc.config import DEFAULT_DATA_DIR, Settings, settings_error
from memsvc.contract import DataDirInUse, InvalidInput, MemsvcError, NotFound

__all__ = ["DEFAULT_DATA_DIR", "ApiKeyOption", "DataDir", "DeviceOption", "Model", "SinkPositions", "Url",
           "check_text_files", "cli_errors", "need_model_side"]

Url = Annotated[str | None, typer.Option(envvar="MEMSVC_URL", help="server URL; default: embedded store")]
DataDir = Annotated[Path, typer.Option(envvar="MEMSVC_DATA_DIR", help="embedded store directory (without --url)")]
ApiKeyOption = Annotated[str | None, typer.Option(envvar="MEMSVC_API_KEY", help="bearer key of the server")]
Model = Annotated[str, typer.Option(help="'smollm2', a local HF model directory or a .gguf file")]
SinkPositions = Annotated[str, typer.Option(help="block memory: the sinks 'kept' where the cache keeps them (after a "
                                                 "re-base before the window, so a long retrieved run may sit below "
                                                 "them) or 'below' the retrieved run, as in the stream (every block "
                                                 "retrieved is then full attention); default kept (measured: "
                                                 "bench/results/longctx.md section 19)")]
DeviceOption = Annotated[str | None, typer.Option(
    "--device", envvar="MEMSVC_DEVICE",
    help="torch device of the model: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu; "
         "bfloat16 weights on a GPU, float32 on the CPU)")]


@contextmanager
def cli_errors() -> Iterator[None]:
    """Typed errors, bad `MEMSVC_*` settings, and a part of memsvc this install leaves out, become one line on
    stderr (`error: ...`) and exit status 2."""
    try:
        yield
    except DataDirInUse as exc:
        advice = "" if exc.ours else "; to use a running server's memories, give its --url (or set MEMSVC_URL)"
        typer.echo(f"error: {exc.message}{advice}", err=True)
        raise typer.Exit(2) from None
    except MemsvcError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        typer.echo(f"error: bad setting {settings_error(exc)}", err=True)
        raise typer.Exit(2) from None
    except ModuleNotFoundError as exc:
        message = missing_part(exc)
        if message is None:
            raise
        typer.echo(message, err=True)
        raise typer.Exit(2) from None


def check_text_files(paths: list[Path]) -> None:
    """Every path is a readable UTF-8 file (NotFound, InvalidInput): checked before anything slow starts."""
    if not paths:
        raise InvalidInput("no files given", "files")
    for path in paths:
        if not path.is_file():
            raise NotFound(f"no such file: {path}", "files")
        try:
            with open(path, encoding="utf-8") as f:
                while f.read(1 << 20):
                    pass
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{path} is not UTF-8 text ({exc.reason})", "files") from None
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot be read ({exc.strerror})", "files") from None


def need_model_side() -> None:
    """ModuleNotFoundError (which `cli_errors` turns into the extra to install) when torch or transformers is
    not installed: found without importing them, so a model command says so before it does anything."""
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
