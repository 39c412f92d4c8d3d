"""Memory-attention sessions on a server: `--url`/`--session`/`--end-session` of `memsvc generate` and
`memsvc eval-long`, and `memsvc session list|end` (the `session_app` typer sub-app).

With `--url`, what the bounded cache evicts goes to the memory `--memory` (default `knn-attention`) on that
server, in the session's partitions "{id}/l{layer}/h{kv_head}" (`lm.memory_attention`; one batched search
per layer per forward, vectors as binary tensor frames). A kept session outlives the process
(`lm.sessions`): `--session ID` resumes it from a later process, whose stream goes on where the earlier one
stopped, with every token the earlier one took in searchable. `memsvc session end ID` (or `--end-session`)
deletes its partitions.

`open_server_session` runs before torch is imported: a bad URL, an unreachable server, a bad memory name, a
memory that cannot hold attention keys (metric, value kind), a missing memory, an unknown session or positions
other than the session's fail with one line and exit status 2 before the model loads.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from memsvc.cli.options import ApiKeyOption, cli_errors
from memsvc.contract import InvalidInput, NotFound

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from memsvc.client import MemoryClient, RemoteMemory

DEFAULT_MEMORY = "knn-attention"
NEW = "new"

SessionOption = Annotated[str | None, typer.Option(
    "--session", help="with --url: 'new' starts a memory-attention session that is kept on the server (its id "
                      "printed on stderr), an id resumes a kept one")]
EndSession = Annotated[bool, typer.Option(
    "--end-session", help="with --url: end the session when this run ends (delete its partitions)")]
MemoryName = Annotated[str, typer.Option("--memory", help="memory on the --url server that holds the sessions "
                                                          "(created if missing)")]
ServerUrl = Annotated[str, typer.Option(envvar="MEMSVC_URL", help="server URL")]

session_app = typer.Typer(help="Memory-attention sessions kept on a server: list them, end them.",
                          no_args_is_help=True)


@dataclass
class ServerSession:
    """Where a run's memory attention lives on a server, checked before the model loads: the memory (None
    until the model's head size is known, `memory_on_server` creates it), the session id, whether it is kept
    when the run ends (`persist`), and the positions mode of the session being resumed (None: a new one)."""

    client: MemoryClient
    name: str
    memory: RemoteMemory | None
    session: str | None
    persist: bool
    positions: str | None = None

    @property
    def new(self) -> bool:
        return self.persist and self.positions is None


def open_server_session(url: str, api_key: str | None, name: str, session: str | None, end: bool,
                        positions: str | None) -> ServerSession:
    """Check the server, the memory (its name, and if it exists its kind: a head-size dim is checked once the
    model is loaded) and the session (`session`: None for a run-only session, "new", or the id of a kept one)
    before anything slow; `positions` as given on the command line (None: the default, or
    a resumed session's). The caller closes `client`."""
    from lm.sessions import (
        check_memory_name,
        check_session_id,
        check_session_memory,
        find_session,
        kept_session,
        new_session_id,
    )
    from memsvc.client import MemoryClient, check_url

    check_url(url)
    check_memory_name(name)
    if session is not None and session != NEW:
        check_session_id(session)
    client = MemoryClient(url, api_key=api_key)
    try:
        try:
            memory = client.memory(name)  # ServerUnavailable when nothing answers at url
        except NotFound:
            memory = None
        if memory is not None:
            check_session_memory(memory.spec)  # its dim against the model's head size once the model is loaded
        if session is None or session == NEW:
            sid = None if session is None else new_session_id()
            if memory is not None and sid is not None:
                kept_session(memory, sid)  # the memory can record it: InvalidInput now, not when the run ends
            return ServerSession(client, name, memory, sid, session is not None and not end)
        if memory is None:
            raise NotFound(f"no memory '{name}' on {url}: there is no session '{session}' to resume", "session")
        state = find_session(memory, session)
        if positions is not None and positions != state.positions:
            raise InvalidInput(f"session '{session}' stored its keys with positions '{state.positions}'; resume it "
                               f"with those, not '{positions}'", "positions")
        return ServerSession(client, name, memory, session, not end, state.positions)
    except BaseException:
        client.close()
        raise


@contextmanager
def memory_on_server(model: PreTrainedModel, where: ServerSession, index: str) -> Iterator[RemoteMemory]:
    """The session's memory on the server, created for the model's head size if missing. A memory made for a
    run-only session goes when the run ends (its log too); one holding kept sessions stays. Says on stderr
    which session a new kept one is."""
    from lm.memory_attention import head_dim

    created = where.memory is None
    if created:
        dim = head_dim(model)
        where.memory = where.client.create_memory(where.name, dim=dim, metric="ip", value_kind="vector",
                                                  value_dim=dim, index=index)
    if where.new:
        typer.echo(f"memory-attention session {where.session} (memory '{where.name}' on {where.client.url}); "
                   f"resume it with --session {where.session}, end it with: memsvc session end {where.session}",
                   err=True)
    try:
        yield where.memory
    finally:
        if created and where.session is None:
            where.client.delete_memory(where.name)


@session_app.command("list")
def list_sessions(url: ServerUrl, memory: MemoryName = DEFAULT_MEMORY, api_key: ApiKeyOption = None,
                  as_json: Annotated[bool, typer.Option("--json", help="print one JSON object, nothing else")]
                  = False) -> None:
    """The kept sessions of a memory: id, stream tokens taken in, positions, model."""
    from lm.sessions import check_memory_name, sessions
    from memsvc.client import MemoryClient

    with cli_errors():
        check_memory_name(memory)
        with MemoryClient(url, api_key=api_key) as client:
            kept = sessions(client.memory(memory))
    if as_json:
        sys.stdout.write(json.dumps({"memory": memory, "sessions": {sid: s.fields() for sid, s in kept.items()}})
                         + "\n")
        return
    for sid, state in kept.items():
        typer.echo(f"{sid}\t{state.tokens} tokens\tpositions {state.positions}\t{state.model}")


@session_app.command("end")
def end(session: Annotated[str, typer.Argument(help="the session's id")], url: ServerUrl,
        memory: MemoryName = DEFAULT_MEMORY, api_key: ApiKeyOption = None) -> None:
    """End a kept session: delete its partitions (every entry it stored) and its record."""
    from lm.sessions import check_memory_name, check_session_id, end_session
    from memsvc.client import MemoryClient, check_url

    with cli_errors():
        check_url(url)
        check_memory_name(memory)
        check_session_id(session)
        with MemoryClient(url, api_key=api_key) as client:
            deleted = end_session(client.memory(memory), session)
    typer.echo(f"ended session {session}: deleted {deleted} entries from memory '{memory}'")
