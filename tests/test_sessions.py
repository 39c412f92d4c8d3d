"""Memory-attention sessions on a server (issue 15 #4): `generate`/`eval-long --url` keep the session's memory
on a live `memsvc serve`, a later run resumes it by id with the same history, `memsvc session end` deletes its
partitions, and bad sessions or servers fail before the model loads. A tiny random Llama saved as a local
model directory; the server is a real subprocess (`conftest.server`)."""
from __future__ import annotations

import json
import re

import pytest
from conftest import free_port, talking_llama

from lm.sessions import sessions
from memsvc.client import MemoryClient
from memsvc.contract import InvalidInput

TEXT = ("The csv module implements classes to read and write tabular data in CSV format. It allows "
        "programmers to say, write this data in the format preferred by Excel. ") * 2
LATER = "The json module exposes an API familiar to users of the marshal and pickle modules. " * 2
CACHE = ("--cache", "window:16,sinks:2", "--memory-attention")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return talking_llama()


@pytest.fixture(scope="module")
def cli(tiny, tmp_path_factory):
    """Run `memsvc ...` in-process with the tiny model (untied output layer: varied tokens) saved as a local HF
    directory."""
    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    model_dir = tmp_path_factory.mktemp("tiny-model")
    tiny[0].save_pretrained(model_dir)
    tiny[1].save_pretrained(model_dir)

    def run(*args: str, model: str = str(model_dir)):
        args = [*map(str, args)]
        return CliRunner().invoke(app, args if args[0] == "session" else [*args, "--model", model])

    return run


def session_id(stderr: str) -> str:
    return re.search(r"memory-attention session (\w+) ", stderr).group(1)


def partitions(url: str, memory: str) -> dict[str, int]:
    with MemoryClient(url) as client:
        return {p.name: p.count for p in client.memory(memory).stats().partitions}


def expected_texts(tiny, prompts: list[str]) -> list[str]:
    """What two runs of one kept session generate, in-process (a RAM memory, a fresh cache per run)."""
    from lm.attention import attach
    from lm.cache import BoundedCache
    from lm.generate import generate
    from lm.memory_attention import KnnConfig, session_memory
    from lm.policies import Window

    memory, texts = session_memory(tiny[0]), []
    for prompt in prompts:
        cache = BoundedCache(tiny[0], Window(16, 2))
        with attach(tiny[0], cache, KnnConfig(blocks=0), memory, session="s", persist=True):
            texts.append("".join(generate(*tiny, prompt, max_new_tokens=6, cache=cache)))
    return texts


def test_generate_keeps_its_session_on_the_server_and_a_later_run_resumes_it(cli, tiny, server):
    first = cli("generate", TEXT, "--no-chat", "--max-new-tokens", 6, *CACHE, "--url", server.url,
                "--memory", "talks")
    assert first.exit_code == 0, first.output
    sid = session_id(first.stderr)
    prompt_tokens = len(tiny[1](TEXT).input_ids)
    taken = prompt_tokens + 5  # the prompt and every generated token but the last (never fed to the model)
    kv_parts = {f"{sid}/l{layer}/h{h}" for layer in (0, 1) for h in (0, 1)}
    assert partitions(server.url, "talks") == dict.fromkeys(kv_parts, taken)  # evicted, then the cache flushed

    second = cli("generate", LATER, "--no-chat", "--max-new-tokens", 6, *CACHE, "--url", server.url,
                 "--memory", "talks", "--session", sid)
    assert second.exit_code == 0, second.output
    assert "memory-attention session" not in second.stderr  # resumed, not new
    taken += len(tiny[1](LATER).input_ids) + 5
    assert partitions(server.url, "talks") == dict.fromkeys(kv_parts, taken)
    expected = expected_texts(tiny, [TEXT, LATER])
    assert [first.stdout, second.stdout] == [text + "\n" for text in expected]
    assert expected[1] != expected_texts(tiny, [LATER])[0]  # without the first run's history: another answer

    listed = json.loads(cli("session", "list", "--url", server.url, "--memory", "talks", "--json").stdout)
    assert listed["sessions"][sid]["tokens"] == taken and listed["sessions"][sid]["positions"] == "absolute"
    ended = cli("session", "end", sid, "--url", server.url, "--memory", "talks")
    assert ended.exit_code == 0, ended.output
    assert ended.stdout == f"ended session {sid}: deleted {4 * taken} entries from memory 'talks'\n"
    assert partitions(server.url, "talks") == {}
    again = cli("session", "end", sid, "--url", server.url, "--memory", "talks")
    assert again.exit_code == 2 and again.stderr == f"error: unknown session '{sid}' in memory 'talks'\n"


def test_eval_long_resumes_a_kept_session_and_end_session_deletes_it(cli, tiny, server, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(LATER)
    common = ("eval-long", "--window", 8, "--sinks", 2, "--knn-memory", "--k", 4, "--skip", 0, "--url", server.url,
              "--memory", "evals", "--json")
    first = cli(*common, tmp_path / "a.txt", "--session", "new")
    assert first.exit_code == 0, first.output
    sid = session_id(first.stderr)
    with MemoryClient(server.url) as client:
        assert sessions(client.memory("evals"))[sid].tokens == len(tiny[1](TEXT).input_ids) - 1
    second = cli(*common, tmp_path / "b.txt", "--session", sid, "--end-session")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["tokens"] == len(tiny[1](LATER).input_ids) - 1
    assert partitions(server.url, "evals") == {}
    with MemoryClient(server.url) as client:
        assert sessions(client.memory("evals")) == {}


def test_bad_sessions_and_servers_fail_before_the_model_loads(cli, server, tmp_path):
    """--model names no model at all: every one of these must stop before loading it."""
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    dead = f"http://127.0.0.1:{free_port()}"
    with MemoryClient(server.url) as client:
        client.create_memory("kept", dim=16, metric="ip", value_kind="vector", value_dim=16)
    cases = {
        ("generate", "hi", *CACHE, "--url", dead):
            f"error: cannot reach the memsvc server at {dead} ([Errno 111] Connection refused); is it running, "
            "and is the URL right?",
        ("generate", "hi", *CACHE, "--url", server.url, "--memory", "kept", "--session", "nope"):
            "error: unknown session 'nope' in memory 'kept' (its sessions: none)",
        ("generate", "hi", *CACHE, "--url", server.url, "--memory", "absent", "--session", "nope"):
            f"error: no memory 'absent' on {server.url}: there is no session 'nope' to resume",
        ("generate", "hi", *CACHE, "--session", "abc"):
            "error: --session and --end-session keep memory attention on a server: give --memory-attention and "
            "its --url",
        ("generate", "hi", *CACHE, "--url", server.url, "--session", "a b"):
            "error: session id must be 1..64 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
            "got 'a b'",
        ("generate", "hi", *CACHE, "--url", server.url, "--memory-blocks", "64"):
            "error: --url applies only to per-token memory (--memory-blocks 0); block memory lives in RAM",
        ("eval-long", doc, doc, "--knn-memory", "--url", server.url, "--session", "new"):
            "error: a session is one stream: give one file with --session, not 2",
        ("eval-long", doc, "--knn-memory", "--url", server.url, "--memory", "kept", "--session", "nope"):
            "error: unknown session 'nope' in memory 'kept' (its sessions: none)",
        ("eval-long", doc, "--knn-memory", "--session", "new"):
            "error: --session and --end-session keep memory attention on a server: give its --url",
    }
    for args, message in cases.items():
        result = cli(*args, model="/nonexistent-model")
        assert (result.exit_code, result.stderr) == (2, message + "\n"), args


def test_a_session_resumed_with_other_positions_is_refused(cli, server):
    from lm.sessions import SessionState, save_session

    with MemoryClient(server.url) as client:
        memory = client.create_memory("moved", dim=16, metric="ip", value_kind="vector", value_dim=16)
        save_session(memory, SessionState("s1", 40, "none", [0, 1]))
    result = cli("generate", "hi", *CACHE, "--url", server.url, "--memory", "moved", "--session", "s1",
                 "--positions", "absolute", model="/nonexistent-model")
    message = "error: session 's1' stored its keys with positions 'none'; resume it with those, not 'absolute'\n"
    assert (result.exit_code, result.stderr) == (2, message)


def test_malformed_session_records_are_one_line_errors_and_can_be_ended(cli, server):
    """Metadata is anyone's to PATCH: a record that is not a session's is named (and how to end it), never a
    traceback; a new session is refused before the model loads when the memory could not record it."""
    from lm.sessions import SESSIONS, SessionState, save_session

    good = SessionState("ok1", 40, "absolute", [0, 1]).fields()
    records = {
        "few": ({"few": {"tokens": 3}}, "its fields must be layers, model, positions, tokens"),
        "extra": ({"extra": {**good, "colour": "red"}}, "its fields must be layers, model, positions, tokens"),
        "num": ({"num": 7}, "its fields must be layers, model, positions, tokens"),
        "neg": ({"neg": {**good, "tokens": -3}}, "tokens must be a non-negative integer, got -3"),
        "flag": ({"flag": {**good, "tokens": True}}, "tokens must be a non-negative integer, got True"),
        "lay": ({"lay": {**good, "layers": [0, "x"]}}, "layers must be a list of non-negative integers, got [0, 'x']"),
        "pos": ({"pos": {**good, "positions": 3}}, "positions must be a string, got 3"),
    }
    with MemoryClient(server.url) as client:
        memory = client.create_memory("odd", dim=16, metric="ip", value_kind="vector", value_dim=16)
        for sid, (record, why) in records.items():
            memory.set_metadata({SESSIONS: {"ok1": good, **record}})
            message = (f"error: session '{sid}' in memory 'odd' has a malformed record ({why}); end it with: "
                       f"memsvc session end {sid}\n")
            listed = cli("session", "list", "--url", server.url, "--memory", "odd")
            resumed = cli("generate", "hi", *CACHE, "--url", server.url, "--memory", "odd", "--session", sid,
                          model="/nonexistent-model")
            assert (listed.exit_code, listed.stderr) == (2, message), sid
            assert (resumed.exit_code, resumed.stderr) == (2, message), sid
            ended = cli("session", "end", sid, "--url", server.url, "--memory", "odd")
            assert (ended.exit_code, ended.stdout) == (0, f"ended session {sid}: deleted 0 entries from memory 'odd'\n")
            assert client.memory("odd").stats().metadata == {SESSIONS: {"ok1": good}}  # only that record went
        memory.set_metadata({SESSIONS: "ok1"})
        message = ("error: memory 'odd' has metadata 'attention_sessions' that is not an object of session records "
                   "(a str); fix or drop it with PATCH /v1/memories/odd\n")
        for args in [("session", "list", "--url", server.url, "--memory", "odd"),
                     ("session", "end", "ok1", "--url", server.url, "--memory", "odd"),
                     ("generate", "hi", *CACHE, "--url", server.url, "--memory", "odd", "--session", "ok1"),
                     ("generate", "hi", *CACHE, "--url", server.url, "--memory", "odd")]:
            result = cli(*args, model="/nonexistent-model")
            assert (result.exit_code, result.stderr) == (2, message), args
        with pytest.raises(InvalidInput, match="not an object of session records"):
            save_session(memory, SessionState("s2", 1, "absolute", [0]))
        assert client.memory("odd").stats().metadata == {SESSIONS: "ok1"}  # nothing was changed


def test_a_memory_that_cannot_hold_sessions_is_refused_before_the_model_loads(cli, server, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    with MemoryClient(server.url) as client:
        client.create_memory("tokens4", dim=4, metric="l2", value_kind="token")
        client.create_memory("l2vec", dim=16, metric="l2", value_kind="vector", value_dim=16)
        client.create_memory("short", dim=16, metric="ip", value_kind="vector", value_dim=8)
    kind = "must have metric='ip', value_kind='vector' and value_dim equal to its dim for this model; it has"
    cases = {
        ("generate", "hi", *CACHE, "--url", server.url, "--memory", "Bad/Name"):
            "error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
            "got 'Bad/Name'",
        ("eval-long", doc, "--knn-memory", "--url", server.url, "--memory", "-x", "--session", "new"):
            "error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
            "got '-x'",
        ("generate", "hi", *CACHE, "--url", server.url, "--memory", "tokens4"):
            f"error: memory 'tokens4' {kind} dim=4, metric='l2', value_kind='token', value_dim=None",
        ("eval-long", doc, "--knn-memory", "--url", server.url, "--memory", "l2vec"):
            f"error: memory 'l2vec' {kind} dim=16, metric='l2', value_kind='vector', value_dim=16",
        ("generate", "hi", *CACHE, "--url", server.url, "--memory", "short", "--session", "new"):
            f"error: memory 'short' {kind} dim=16, metric='ip', value_kind='vector', value_dim=8",
    }
    for args in [("session", "list", "--url", server.url, "--memory", "bad name!"),
                 ("session", "end", "s1", "--url", server.url, "--memory", "bad name!")]:
        cases[args] = ("error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or "
                       "digit), got 'bad name!'")
    for args, message in cases.items():
        result = cli(*args, model="/nonexistent-model")
        assert (result.exit_code, result.stderr) == (2, message + "\n"), args
    with MemoryClient(server.url) as client:
        assert "Bad" not in {spec.name for spec in client.list_memories()}  # nothing was made
