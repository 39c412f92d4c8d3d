"""The `memsvc` command line (typer). Keep heavy imports (torch, transformers) inside the commands."""
from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from memsvc.cli.options import DEFAULT_DATA_DIR, ApiKeyOption, DataDir, DeviceOption, Url, cli_errors
from memsvc.config import Settings
from memsvc.contract import (
    MAX_DOCUMENT_ID,
    DataDirInUse,
    InvalidInput,
    MemsvcError,
    NotFound,
    check_ask,
    check_device,
    check_document_id,
    check_k,
)

if TYPE_CHECKING:
    from memsvc.contract import CollectionBackend, Document

app = typer.Typer(help="memsvc: retrieval-augmented long-context memory for transformer LMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main() -> None:
    """memsvc: retrieval-augmented long-context memory for transformer LMs."""


def server_io() -> dict[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop when installed (the `server` extra
    installs them; 0.3-0.5 ms less server CPU per batch-1 search here, bench/RESULTS.md), else h11
    and asyncio."""
    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    return {"http": "httptools" if have("httptools") else "h11", "loop": "uvloop" if have("uvloop") else "asyncio"}


def check_port_free(host: str, port: int) -> None:
    """InvalidInput (field "port") when nothing could listen on host:port now (another server holds it, or the
    host is not an interface of this machine), so `serve` says so in one line instead of uvicorn's log line and
    exit 3. Binds with SO_REUSEADDR, as uvicorn does, and lets go at once; port 0 (any free port) always passes."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror}", "host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidInput(f"cannot listen on {host}:{port} ({exc.strerror}): stop what holds it, or serve "
                               "another --port", "port") from None


@app.command()
def serve(host: Annotated[str, typer.Option(envvar="MEMSVC_HOST", help="interface to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(envvar="MEMSVC_PORT", help="port")] = 8000,
          data_dir: Annotated[Path, typer.Option(envvar="MEMSVC_DATA_DIR", help="memories and catalog")]
          = DEFAULT_DATA_DIR) -> None:
    """Serve the REST API (docs at /docs); other MEMSVC_* environment variables set the rest."""
    with cli_errors():
        import uvicorn

        from memsvc.api.app import create_app
        from memsvc.observability import configure_logging

        settings = Settings(host=host, port=port, data_dir=data_dir)
        if (settings.data_dir / ".lock").exists():  # held by another process: one line now, not a log traceback
            from memsvc.store.store import hold_data_dir

            try:
                hold_data_dir(settings.data_dir).close()
            except DataDirInUse as exc:
                raise InvalidInput(f"{exc.message}: stop it, or serve another --data-dir", "data_dir") from None
        check_port_free(settings.host, settings.port)
    configure_logging(settings.log_level)
    fast = server_io()
    logging.getLogger("memsvc").info("HTTP parser %s, event loop %s", fast["http"], fast["loop"], extra=fast)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, **fast)


CollectionName = Annotated[str, typer.Option("--collection", "-c", help="collection name")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
Timeout = Annotated[float, typer.Option(min=1, help="seconds to wait for the server (embedding and generation "
                                                    "are slow on CPU; the first ask loads the model)")]


@contextmanager
def open_collection(name: str, url: str | None, data_dir: Path, api_key: str | None, timeout: float = 600.0,
                    create: bool = False, device: str | None = None) -> Iterator[CollectionBackend]:
    """The collection on the server at `url` (waiting up to `timeout` per request), or in the embedded
    store (its `ask` model on `device`); created if missing and `create`."""
    from memsvc.connect import connect

    with connect(url, data_dir, api_key, timeout, device) as client:
        try:
            col = client.collection(name)
        except NotFound:
            if not create:
                raise
            col = client.create_collection(name)
        yield col


ID_RULE = f"document ids are printable strings of 1..{MAX_DOCUMENT_ID} characters"


def is_document_id(document_id: str) -> bool:
    """Whether an upsert takes `document_id` (`check_document_id`)."""
    try:
        check_document_id(document_id)
    except InvalidInput:
        return False
    return True


def shown(document_id: str, most: int = 60) -> str:
    """`document_id` quoted (control characters escaped), cut to its first `most` characters (then '...')."""
    return repr(document_id) if len(document_id) <= most else f"{document_id[:most]!r}..."


def one_line(path: Path) -> str:
    """`path` as text, quoted with its control characters escaped where it has any (a message stays one line)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def id_fault(document_id: str) -> str:
    """What a document id that `check_document_id` refuses has wrong, in words."""
    if len(document_id) > MAX_DOCUMENT_ID:
        return f"has {len(document_id)} characters"
    bad = next(c for c in document_id if not c.isprintable())
    return f"has the unprintable character {bad!r}"


def check_id_prefix(prefix: str) -> None:
    """InvalidInput (field prefix) for an `ingest --prefix` no document id can start with: one with a character
    no id may have, or one that leaves no room for a file name."""
    if prefix and not prefix.isprintable():
        raise InvalidInput(f"--prefix {shown(prefix)} {id_fault(prefix)}; {ID_RULE}", "prefix")
    if len(prefix) >= MAX_DOCUMENT_ID:
        raise InvalidInput(f"--prefix has {len(prefix)} characters, leaving no room for a file name; {ID_RULE}",
                           "prefix")


def ingest_files(paths: list[Path], prefix: str = "",
                 id_from: Literal["relative", "path"] = "relative") -> list[tuple[str, Path]]:
    """(document id, file) of every file, in argument order. With `id_from` "relative", a file argument's
    id is its name and a directory's files are identified by their path relative to that directory
    (recursed, sorted); with "path", every file by its path as given (`a/notes.txt`, `docs/guide/x.md`).
    Each id is prefixed with `prefix`. The same file reached twice under one id counts once; two different files
    that would get one id are an InvalidInput naming both, before anything is read or written.

    Ids depend only on each argument, never on the others given with it, so ingesting a directory alone
    or together with another gives its documents the same ids (an id relative to the arguments' common
    root would change with the set of arguments and silently duplicate documents on the next ingest).
    Every id must pass the rule every upsert applies (`check_document_id`: printable, 1..MAX_DOCUMENT_ID
    characters): InvalidInput naming the prefix or the file otherwise. Raises NotFound for a path that does
    not exist."""
    check_id_prefix(prefix)
    files: dict[str, Path] = {}
    for path in paths:
        if path.is_dir():
            found = [(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()]
        elif path.is_file():
            found = [(path.name, path)]
        else:
            raise NotFound(f"{path}: no such file or directory", "paths")
        for name, file in found:
            document_id = prefix + (file.as_posix() if id_from == "path" else name)
            if not is_document_id(document_id):
                raise InvalidInput(f"{one_line(file)} would be document {shown(document_id)}, which {id_fault(document_id)}; "
                                   f"{ID_RULE}", "paths")
            first = files.setdefault(document_id, file)
            if first != file and first.resolve() != file.resolve():
                raise InvalidInput(
                    f"{first} and {file} would both be document {document_id!r}: ingest them in separate calls "
                    "with different --prefix values (e.g. --prefix a/), or name documents by their paths (--id-from path)",
                    "paths")
    return list(files.items())


@app.command()
def ingest(paths: Annotated[list[Path], typer.Argument(help="files and directories (recursed)")],
           collection: CollectionName, url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR,
           api_key: ApiKeyOption = None, timeout: Timeout = 600.0,
           batch: Annotated[int, typer.Option(min=1, help="documents per request")] = 16,
           prefix: Annotated[str, typer.Option(help="put this before every document id, e.g. 'a/'")] = "",
           id_from: Annotated[Literal["relative", "path"], typer.Option(
               help="relative: a file's name, a directory's files by their path inside it; "
                    "path: every file by its path as given")] = "relative") -> None:
    """Upsert files as documents into the collection (created if missing); unchanged files are skipped.

    A file's document id is its name; a directory's files are identified by their path relative to that
    directory (`docs/` holding `guide/intro.md` gives `guide/intro.md`); with `--id-from path`, every
    file by its path as given (`docs/guide/intro.md`). `--prefix` goes before every id. Two different
    files that would get one id (`a/notes.txt b/notes.txt`) are an error naming both (exit 2) before
    anything is written: use `--id-from path`, or separate calls with different `--prefix`es.

    A file that cannot be a document (not UTF-8, empty, too large) is skipped with a message on stderr,
    the rest are ingested, and the exit status is then 1.
    """
    from tqdm import tqdm

    from memsvc.contract import Document

    counts = {"added": 0, "updated": 0, "unchanged": 0, "skipped": 0, "chunks": 0}
    with cli_errors():
        files = ingest_files(paths, prefix, id_from)  # every id settled before anything is created
    with (cli_errors(), open_collection(collection, url, data_dir, api_key, timeout, create=True) as col,
          tqdm(total=len(files), unit="file", desc=f"ingest {collection}") as progress):
        for start in range(0, len(files), batch):
            documents = []
            for document_id, path in files[start:start + batch]:
                try:
                    documents.append(Document(document_id, path.read_bytes().decode("utf-8")))
                except UnicodeDecodeError as exc:
                    skip(str(path), f"not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})", counts)
            for document, outcome in upsert_each(col, documents, counts):
                if isinstance(outcome, MemsvcError):
                    skip(document.id, outcome.message, counts)
            progress.set_postfix(chunks=counts["chunks"],  # chunks/s: embedding is the slow part
                                 chunks_per_s=f"{counts['chunks'] / max(progress.format_dict['elapsed'], 1e-9):.1f}")
            progress.update(len(files[start:start + batch]))
    typer.echo(", ".join(f"{n} {what}" for what, n in counts.items()))
    if counts["skipped"]:
        raise typer.Exit(1)


def upsert_each(col: CollectionBackend, documents: list[Document],
                counts: dict[str, int]) -> Iterator[tuple[Document, MemsvcError | None]]:
    """Upsert a batch in one call; if the batch is refused, each document alone, so one bad document
    costs only itself. Yields each document's error (or None), counting outcomes into `counts`."""
    if not documents:
        return
    try:
        results = [col.upsert(documents)]
        errors: list[MemsvcError | None] = [None] * len(documents)
    except MemsvcError as exc:
        if len(documents) == 1:
            yield documents[0], exc
            return
        results, errors = [], []
        for document in documents:
            try:
                results.append(col.upsert([document]))
                errors.append(None)
            except MemsvcError as exc:
                errors.append(exc)
    for result in results:
        for what in ("added", "updated", "unchanged"):
            counts[what] += len(getattr(result, what))
        counts["chunks"] += result.chunks
    yield from zip(documents, errors)


def skip(what: str, why: str, counts: dict[str, int]) -> None:
    counts["skipped"] += 1
    typer.echo(f"skipped {what}: {why}", err=True)


@app.command()
def search(query: Annotated[str, typer.Argument(help="what to look for")], collection: CollectionName,
           mode: Annotated[Literal["bm25", "dense", "hybrid"], typer.Option(help="retriever")] = "hybrid",
           k: Annotated[int, typer.Option("--k", help="hits to show")] = 10, json_: Json = False,
           url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR, api_key: ApiKeyOption = None,
           timeout: Timeout = 600.0) -> None:
    """The collection's best chunks for QUERY."""
    with cli_errors():
        check_k(k)  # before the store opens or a request goes
    with cli_errors(), open_collection(collection, url, data_dir, api_key, timeout) as col:
        hits = col.search(query, k, mode)
    if json_:
        typer.echo(json.dumps({"hits": [asdict(h) for h in hits]}))
        return
    for hit in hits:
        first = " ".join(hit.text.split())[:100]
        typer.echo(f"{hit.score:8.4f}  {hit.chunk_id}{f'  [{hit.section}]' if hit.section else ''}\n          {first}")


@app.command()
def ask(question: Annotated[str, typer.Argument(help="a question the collection's documents answer")],
        collection: CollectionName,
        k: Annotated[int, typer.Option("--k", help="passages given to the model")] = 4,
        max_new_tokens: Annotated[int, typer.Option(help="longest answer, in tokens")] = 256, json_: Json = False,
        url: Url = None, data_dir: DataDir = DEFAULT_DATA_DIR, api_key: ApiKeyOption = None,
        timeout: Timeout = 600.0, device: DeviceOption = None) -> None:
    """Answer QUESTION from the collection's best passages with SmolLM2, citing them: the answer is printed as
    it decodes, the passages given to the model at the end (* where the answer cites them); with --json, one
    object once the answer is complete. With --url the server runs the model on its own device (its
    MEMSVC_DEVICE); --device is for the embedded store."""
    with cli_errors():
        check_ask(k, max_new_tokens)  # the numbers and the device's name: before the store opens or a request goes
        check_device(device)  # a name no device has, torch-free (with --url too: it is a mistake either way)
        if url is None:
            from lm.devices import resolve_device

            resolve_device(device)  # a device this machine lacks: before the store is opened or the model loaded
        with open_collection(collection, url, data_dir, api_key, timeout, device=device if url is None else None) \
                as col:
            if json_:
                with waiting(ASK_WAIT):
                    answer = col.ask(question, k, max_new_tokens)
                typer.echo(json.dumps(asdict(answer)))
                return
            with ExitStack() as stack:
                with waiting(ASK_WAIT):  # the model loads (a first ask) and reads the passages
                    stream = stack.enter_context(col.ask_stream(question, k, max_new_tokens))
                    pieces = iter(stream)
                    first = next(pieces, "")
                for piece in itertools.chain([first], pieces):
                    typer.echo(piece, nl=False)  # click flushes each piece
                answer = stream.result()
            typer.echo()
    for c in answer.citations:
        typer.echo(f"[{c.n}]{'*' if c.cited else ' '} {c.chunk_id}")


ASK_WAIT = "ask: waiting for the first token (a first ask loads the model)"


@contextmanager
def waiting(desc: str, every: float = 0.5) -> Iterator[None]:
    """A tqdm line on stderr counting the seconds the block takes (refreshed every `every` s by a thread),
    removed when it ends: what a command shows while it waits on something without steps to count."""
    from tqdm import tqdm

    done = threading.Event()
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", leave=False) as bar:
        def tick() -> None:
            while not done.wait(every):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _register_model_commands() -> None:
    """The model-side commands (`memsvc.cli.model`, `memsvc.cli.longctx`); they import torch lazily."""
    from memsvc.cli.longctx import eval_long, train_gate
    from memsvc.cli.model import generate, knnlm_app
    from memsvc.cli.sessions import session_app

    app.add_typer(knnlm_app, name="knnlm")
    app.add_typer(session_app, name="session")
    app.command()(generate)
    app.command("eval-long")(eval_long)
    app.command("train-gate")(train_gate)


_register_model_commands()

