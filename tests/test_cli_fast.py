"""The CLI answers a user's mistake at once: a missing file, a bad option, a held data dir, a dead or
scheme-less --url each exit 2 with one line on stderr, before torch is imported or a model loads (issue 17:
`eval-long /nonexistent.txt` took 135 s, a typo in `--cache` 33-72 s). All cases run in one fresh interpreter,
which then reports whether torch was imported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import fcntl, json, sys, time
from pathlib import Path
from typer.testing import CliRunner
from memsvc.cli.commands import app

cases, data_dir, held = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
held.mkdir(parents=True)
lock = open(held / ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running server holds its data dir
out = []
for args in cases:
    start = time.monotonic()
    result = CliRunner().invoke(app, args)
    out.append([result.exit_code, result.stdout, result.stderr, round(time.monotonic() - start, 2)])
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def probe(cases: dict[tuple[str, ...], str], data: Path, held: Path) -> dict:
    """Run the CLI on each case's arguments in one fresh interpreter (PROBE, `held` locked as by a server):
    {"results": [[exit code, stdout, stderr, seconds], ...], "torch": imported?, "transformers": imported?}."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(cases)), str(data), str(held)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_user_errors_exit_2_with_one_line_before_torch(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 20)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    data, held = tmp_path / "data", tmp_path / "held"
    dead = f"http://127.0.0.1:{free_port()}"
    cases = {
        ("eval-long", "/nonexistent.txt"): "error: no such file: /nonexistent.txt",
        ("eval-long", str(latin1)): f"error: {latin1} is not UTF-8 text (invalid continuation byte)",
        ("eval-long", str(doc), "--policy", "lru"): "error: unknown policy 'lru'; valid policies: full, window, "
                                                    "sinks, moving-average, cumulative-average, recurrent, "
                                                    "compressive, h2o, vatp, knorm, snapkv, adaptive",
        ("eval-long", str(doc), "--policy", "window", "--sinks", "4"):
            "error: policy 'window' takes no sinks (it takes: window)",
        ("eval-long", str(doc), "--knn-memory", "--layers", "x"):
            "error: layers must be 'all' or comma-separated integers, got 'x'",
        ("eval-long", str(doc), "--knn-memory", "--layers", "-1"):
            "error: unknown layer index -1: layer indices are integers from 0",
        ("eval-long", str(doc), "--knn-memory", "--memory-blocks", "0", "--layers", "3,-2,5"):
            "error: unknown layer index -2: layer indices are integers from 0",
        ("eval-long", str(doc), "--url", dead): "error: --url applies only to --knn-memory",
        ("eval-long", str(doc), "--max-tokens", "100"):
            "error: max_tokens 100 leaves no token to score past the first 256 (skip): give max_tokens of at least "
            "258, or a smaller skip",
        ("eval-long", str(doc), "--knn-memory", "--url", "localhost:8000"):
            "error: server URL 'localhost:8000' needs a scheme and a host, e.g. http://127.0.0.1:8000",
        ("generate", "hi", "--cache", "windw:256"):
            "error: bad cache spec 'windw:256': expected 'window:W[,sinks:S]', 'full' or "
            "'policy:NAME[,budget:B,window:W,sinks:S,pool:P]'",
        ("generate", "--prompt-file", "/nonexistent.txt"): "error: /nonexistent.txt: no such file",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--decode-search", "fastest"):
            "error: decode search must be one of exact, rerank, grouped, got 'fastest'",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--memory-blocks", "0", "--decode-search",
         "exact"): "error: decode_candidates (--decode-search) applies only to block memory (memory blocks > 0); "
                    "per-token retrieval takes k",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--decode-search", "rerank",
         "--retrieved-blocks", "200"): "error: decode candidates must be 0 (every block) or at least the retrieved "
                                       "blocks (200), got 192",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--memory-blocks", "0", "--decode-search",
         "grouped"): "error: decode_group (--decode-search) applies only to block memory (memory blocks > 0); "
                     "per-token retrieval takes k",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--memory-blocks", "0", "--retrieved-blocks",
         "4"): "error: top_blocks (--retrieved-blocks) applies only to block memory (memory blocks > 0); per-token "
               "retrieval takes k",
        ("eval-long", str(doc), "--knn-memory", "--memory-blocks", "0", "--rep-keys", "8"):
            "error: rep_keys (--rep-keys) applies only to block memory (memory blocks > 0); per-token retrieval "
            "takes k",
        ("generate", "hi", "--decode-search", "grouped"):
            "error: --memory-blocks, --positions, --decode-search, --decode-blocks and --sink-positions apply only "
            "to --memory-attention",
        ("generate", "hi", "--decode-blocks", "32"):
            "error: --memory-blocks, --positions, --decode-search, --decode-blocks and --sink-positions apply only "
            "to --memory-attention",
        ("generate", "hi", "--sink-positions", "below"):
            "error: --memory-blocks, --positions, --decode-search, --decode-blocks and --sink-positions apply only "
            "to --memory-attention",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--decode-blocks", "0"):
            "error: decoding's retrieved blocks must be a positive integer, got 0",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--decode-blocks", "256"):
            "error: decode candidates must be 0 (every block) or at least the retrieved blocks (256), got 192",
        ("generate", "hi", "--cache", "window:8", "--memory-attention", "--memory-blocks", "0", "--decode-blocks",
         "32"): "error: decode_top_blocks (--decode-blocks) applies only to block memory (memory blocks > 0); "
                "per-token retrieval takes k",
        ("generate", "hi", "--max-new-tokens", "-1"): "error: max_new_tokens must be >= 0, got -1",
        ("generate", "hi", "--temperature", "-0.5"):
            "error: temperature must be a finite number >= 0 (0 = greedy), got -0.5",
        ("generate", "hi", "--temperature", "nan"): "error: temperature must be a finite number >= 0 (0 = greedy), got nan",
        ("generate", "hi", "--temperature", "inf"): "error: temperature must be a finite number >= 0 (0 = greedy), got inf",
        ("generate", "hi", "--top-p", "0"): "error: top_p must be in (0, 1], got 0.0",
        ("generate", "hi", "--top-p", "nan"): "error: top_p must be in (0, 1], got nan",
        ("generate", "hi", "--knn-memory", "m", "--lam", "2"):
            "error: lam: Input should be less than or equal to 1 (got 2.0)",
        ("knnlm", "build", "/nonexistent.txt", "--memory", "m", "--data-dir", str(data)):
            "error: /nonexistent.txt: no such file",
        ("knnlm", "tune", str(doc), "--memory", "m", "--k", "0", "--data-dir", str(data)):
            "error: k: Input should be greater than 0 (got 0)",
        ("train-gate", "/nonexistent.txt", "--out", str(tmp_path / "g.json")): "error: no such file: /nonexistent.txt",
        ("train-gate", str(doc), "--out", str(tmp_path / "no" / "g.json")):
            f"error: {tmp_path / 'no'}: no such directory for --out",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--memory-blocks", "32", "--k", "8"):
            "error: --k applies only to per-token memory (--memory-blocks 0); block memory retrieves whole blocks",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--memory-blocks", "32", "--positions", "none"):
            "error: block memory takes positions ordered, hybrid, absolute; got 'none'",
        ("knnlm", "build", str(doc), "--memory", "m", "--data-dir", str(held)):
            f"error: {held} is in use by another memsvc process (a server or an embedded command); to use a "
            "running server's memories, give its --url (or set MEMSVC_URL)",
        ("search", "x", "--collection", "c", "--url", dead):
            f"error: cannot reach the memsvc server at {dead} ([Errno 111] Connection refused); is it running, "
            "and is the URL right?",
        ("ask", "x", "--collection", "c", "--url", "127.0.0.1:8000"):
            "error: server URL '127.0.0.1:8000' needs a scheme and a host, e.g. http://127.0.0.1:8000",
        ("ingest", "/nonexistent", "--collection", "c", "--url", dead):
            "error: /nonexistent: no such file or directory",
        ("ingest", str(doc), "--collection", "c", "--data-dir", str(data), "--prefix", "a\tb/"):
            "error: --prefix 'a\\tb/' has the unprintable character '\\t'; document ids are printable strings of "
            "1..1024 characters",
        ("ingest", str(doc), "--collection", "c", "--url", dead, "--prefix", "p" * 1018):
            f"error: {doc} would be document {'p' * 60!r}..., which has 1025 characters; document ids are printable "
            "strings of 1..1024 characters",
        # --model, every --cache policy's numbers and --device names, torch-free
        ("generate", "hi", "--model", "/nonexistent-model"): "error: unknown model '/nonexistent-model': expected "
            "'smollm2', a local Hugging Face model directory (with config.json) or a .gguf file",
        ("eval-long", str(doc), "--model", str(tmp_path)): f"error: unknown model '{tmp_path}': expected 'smollm2', "
            "a local Hugging Face model directory (with config.json) or a .gguf file",
        ("knnlm", "build", str(doc), "--memory", "m", "--data-dir", str(data), "--model", "/nonexistent.gguf"):
            "error: unknown model '/nonexistent.gguf': expected 'smollm2', a local Hugging Face model directory "
            "(with config.json) or a .gguf file",
        ("knnlm", "eval", str(doc), "--memory", "m", "--data-dir", str(data), "--model", "smollm3"):
            "error: unknown model 'smollm3': expected 'smollm2', a local Hugging Face model directory (with "
            "config.json) or a .gguf file",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--model", str(doc)):
            f"error: unknown model '{doc}': expected 'smollm2', a local Hugging Face model directory (with "
            "config.json) or a .gguf file",
        # the rest name a model that does not exist: what is refused comes before the model is looked at
        ("generate", "hi", "--cache", "window:0", "--model", "/nonexistent-model"):
            "error: window must be a positive integer, got 0",
        ("generate", "hi", "--cache", "window:4,sinks:8", "--model", "/nonexistent-model"):
            "error: sinks (8) must not exceed the window (4)",
        ("generate", "hi", "--cache", "policy:h2o,budget:64,window:64", "--model", "/nonexistent-model"):
            "error: window + sinks (64) must be below the budget (64)",
        ("generate", "hi", "--cache", "policy:vatp,budget:4,sinks:4", "--model", "/nonexistent-model"):
            "error: budget (4) must be at least sinks + 1 (5)",
        ("generate", "hi", "--cache", "policy:cumulative-average,budget:4", "--model", "/nonexistent-model"):
            "error: budget (4) must be at least sinks + 1 (5)",  # its default sinks, 4
        ("generate", "hi", "--cache", "policy:compressive,pool:0", "--model", "/nonexistent-model"):
            "error: pool must be a positive integer, got 0",
        ("generate", "hi", "--cache", "policy:moving-average,window:0", "--model", "/nonexistent-model"):
            "error: window must be a positive integer, got 0",
        ("generate", "hi", "--cache", "policy:moving-average,budget:64,window:60", "--model", "/nonexistent-model"):
            "error: window + sinks (64) must be below the budget (64)",
        ("generate", "hi", "--cache", "policy:snapkv,window:0", "--model", "/nonexistent-model"):
            "error: window (the observation window) must be a positive integer, got 0",
        ("generate", "hi", "--cache", "policy:knorm,budget:-1", "--model", "/nonexistent-model"):
            "error: budget must be a non-negative integer, got -1",
        ("generate", "hi", "--device", "tpu", "--model", "/nonexistent-model"):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("generate", "hi", "--device", "cuda:x", "--model", "/nonexistent-model"):
            "error: unknown device 'cuda:x': give cpu, cuda, cuda:N or mps",
        ("generate", "hi", "--device", "cuda:-1", "--model", "/nonexistent-model"):
            "error: unknown device 'cuda:-1': give cpu, cuda, cuda:N or mps",
        ("generate", "hi", "--device", "meta", "--model", "/nonexistent-model"):
            "error: unknown device 'meta': give cpu, cuda, cuda:N or mps",
        ("eval-long", str(doc), "--policy", "sinks", "--window", "2", "--model", "/nonexistent-model"):
            "error: sinks (4) must not exceed the window (2)",  # the default sinks
        ("eval-long", str(doc), "--policy", "window", "--window", "0", "--model", "/nonexistent-model"):
            "error: window must be a positive integer, got 0",
        ("eval-long", str(doc), "--policy", "h2o", "--budget", "5", "--window", "10", "--model", "/nonexistent-model"):
            "error: window + sinks (10) must be below the budget (5)",
        ("eval-long", str(doc), "--policy", "adaptive", "--sinks", "-1", "--model", "/nonexistent-model"):
            "error: sinks must be a non-negative integer, got -1",
        ("eval-long", str(doc), "--policy", "recurrent", "--budget", "0", "--model", "/nonexistent-model"):
            "error: budget (0) must be at least sinks + 1 (5)",
        ("eval-long", str(doc), "--policy", "compressive", "--pool", "0", "--model", "/nonexistent-model"):
            "error: pool must be a positive integer, got 0",
        ("eval-long", str(doc), "--device", "tpu", "--model", "/nonexistent-model"):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("eval-long", str(doc), "--device", "cuda:x", "--model", "/nonexistent-model"):
            "error: unknown device 'cuda:x': give cpu, cuda, cuda:N or mps",
        ("knnlm", "build", str(doc), "--memory", "m", "--data-dir", str(data), "--device", "tpu", "--model",
         "/nonexistent-model"): "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("knnlm", "eval", str(doc), "--memory", "m", "--data-dir", str(data), "--device", "cuda:0x"):
            "error: unknown device 'cuda:0x': give cpu, cuda, cuda:N or mps",
        ("knnlm", "tune", str(doc), "--memory", "m", "--data-dir", str(data), "--device", "gpu"):
            "error: unknown device 'gpu': give cpu, cuda, cuda:N or mps",
        ("generate", "hi", "--knn-memory", "m", "--data-dir", str(data), "--device", "tpu"):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--device", "cuda:"):
            "error: unknown device 'cuda:': give cpu, cuda, cuda:N or mps",
        ("ask", "x", "--collection", "c", "--data-dir", str(data), "--device", "tpu"):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("knnlm", "build", str(doc), "--memory", "bad name", "--data-dir", str(data)):
            "error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got "
            "'bad name'",
        ("knnlm", "eval", str(doc), "--memory", "-m", "--data-dir", str(data)):
            "error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got "
            "'-m'",
        ("generate", "hi", "--knn-memory", "a/b", "--data-dir", str(data)):
            "error: memory name must be 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got "
            "'a/b'",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--max-tokens", "1"):
            "error: max_tokens must be at least 2, got 1",
        ("ask", "x", "--collection", "c", "--data-dir", str(data), "--k", "0"): "error: k: Input should be greater than 0",
        ("ask", "x", "--collection", "c", "--url", dead, "--k", "21"):
            "error: k: Input should be less than or equal to 20",
        ("ask", "x", "--collection", "c", "--data-dir", str(data), "--max-new-tokens", "0"):
            "error: max_new_tokens: Input should be greater than 0",
        ("ask", "x", "--collection", "c", "--url", dead, "--max-new-tokens", "1025"):
            "error: max_new_tokens: Input should be less than or equal to 1024",
        ("search", "x", "--collection", "c", "--data-dir", str(data), "--k", "0"):
            "error: k must be an integer in 1..2048, got 0",
        ("search", "x", "--collection", "c", "--url", dead, "--k", "2049"):
            "error: k must be an integer in 1..2048, got 2049",
        ("ask", "x", "--collection", "c", "--url", dead, "--device", "tpu"):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        ("eval-long", str(doc), "--positions", "sideways"):
            "error: positions must be one of absolute, none, window, ordered, hybrid; got 'sideways'",
        ("eval-long", str(doc), "--knn-memory", "--memory-blocks", "0", "--positions", "ordered"):
            "error: positions 'ordered' need block memory (memory blocks > 0); per-token retrieval takes absolute, "
            "none, window",
    }
    report = probe(cases, data, held)
    for (args, expected), (code, stdout, stderr, seconds) in zip(cases.items(), report["results"]):
        assert (code, stdout, stderr.strip()) == (2, "", expected), (args, stderr)
        assert seconds < 10, (args, seconds)  # no model, no torch: the dead --url costs two 0.5 s resends
    assert report["torch"] is False and report["transformers"] is False
    assert not (data / "memories").exists()  # nothing was opened, let alone made


def test_serve_takes_httptools_and_uvloop_when_installed(monkeypatch):
    import importlib.util

    from memsvc.cli import commands

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in ("httptools", "uvloop") else None)
    assert commands.server_io() == {"http": "httptools", "loop": "uvloop"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert commands.server_io() == {"http": "h11", "loop": "asyncio"}


def test_bad_settings_exit_2_with_one_line_naming_the_variable(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    data = tmp_path / "data"
    cases = {
        (("MEMSVC_EMBED_BACKEND", "foo"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_EMBED_BACKEND: Input should be 'auto', 'torch', 'openvino' or 'openvino-int8'",
        (("MEMSVC_MAX_K", "-5"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_MAX_K: Input should be greater than 0",
        (("MEMSVC_MAX_BATCH", "0"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_MAX_BATCH: Input should be greater than 0",
        (("MEMSVC_MAX_DIM", "ten"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_MAX_DIM: Input should be a valid integer, unable to parse string as an integer",
        (("MEMSVC_MAX_BODY_BYTES", "0"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_MAX_BODY_BYTES: Input should be greater than 0",
        (("MEMSVC_SNAPSHOT_BYTES", "-1"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_SNAPSHOT_BYTES: Input should be greater than 0",
        (("MEMSVC_LOG_LEVEL", "INFO"), ("serve", "--port", "70000", "--data-dir", str(data))):
            "error: bad setting MEMSVC_PORT: Input should be less than or equal to 65535",
        (("MEMSVC_API_KEYS", "a b"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_API_KEYS: Value error, entry 1 is not KEY, KEY=PREFIX, KEY:ro or KEY=PREFIX:ro "
            "(keys: letters, digits and ._~+/-; prefixes: letters, digits and ._-)",
        (("MEMSVC_DEVICE", "tpu"), ("serve", "--data-dir", str(data))):
            "error: bad setting MEMSVC_DEVICE: Value error, unknown device 'tpu': give cpu, cuda, cuda:N or mps",
        (("MEMSVC_DEVICE", "cuda:x"), ("search", "x", "--collection", "c", "--data-dir", str(data))):
            "error: bad setting MEMSVC_DEVICE: Value error, unknown device 'cuda:x': give cpu, cuda, cuda:N or mps",
        (("MEMSVC_DEVICE", "tpu"), ("generate", "hi", "--model", "/nonexistent-model")):
            "error: unknown device 'tpu': give cpu, cuda, cuda:N or mps",  # its --device reads MEMSVC_DEVICE
        (("MEMSVC_EMBED_BACKEND", "onnx"), ("search", "x", "--collection", "c", "--data-dir", str(data))):
            "error: bad setting MEMSVC_EMBED_BACKEND: Input should be 'auto', 'torch', 'openvino' or 'openvino-int8'",
    }
    for ((variable, value), args), expected in cases.items():
        monkeypatch.setenv(variable, value)
        result = CliRunner().invoke(app, list(args))
        monkeypatch.delenv(variable)
        assert (result.exit_code, result.stdout, result.stderr.strip()) == (2, "", expected), (variable, value)
    assert not data.exists()  # nothing was served, opened or made


def test_serve_on_a_port_in_use_exits_2_with_one_line(tmp_path):
    """A port another server listens on, and a host that is no interface here: one line and exit 2, nothing made
    (before: uvicorn's JSON log line and exit 3)."""
    import socket

    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    data = tmp_path / "data"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--data-dir", str(data)])
    assert (result.exit_code, result.stdout, result.stderr.strip()) == (
        2, "", (f"error: cannot listen on 127.0.0.1:{port} (Address already in use): stop what holds it, or serve "
                "another --port"))
    result = CliRunner().invoke(app, ["serve", "--host", "192.0.2.1", "--port", str(free_port()), "--data-dir",
                                      str(data)])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot listen on 192.0.2.1:"), result.stderr
    assert "Cannot assign requested address" in result.stderr
    assert not data.exists()


def test_knn_config_layers_are_checked_without_a_model():
    import pytest

    from lm.knn_config import KnnConfig, check_options
    from memsvc.contract import InvalidInput

    for layers in ([0], [29, 0, 3], None):
        check_options(KnnConfig(layers=layers))
    for layers, message in [([], "give at least one layer for kNN-memory attention"),
                            ("0", "give at least one layer for kNN-memory attention"),
                            ([-1], "unknown layer index -1: layer indices are integers from 0"),
                            ([2, -7, -1], "unknown layer index -7: layer indices are integers from 0"),
                            ([1.5], "unknown layer index 1.5: layer indices are integers from 0"),
                            ([True], "unknown layer index True: layer indices are integers from 0")]:
        with pytest.raises(InvalidInput) as err:
            check_options(KnnConfig(layers=layers))
        assert (err.value.message, err.value.field) == (message, "layers"), layers


def test_serve_on_a_held_data_dir_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    """It was a traceback inside a JSON log line from the app's startup, and exit status 3."""
    import fcntl

    import uvicorn
    from typer.testing import CliRunner

    from memsvc.cli.commands import app

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("uvicorn ran"))
    held = tmp_path / "held"
    held.mkdir()
    with open(held / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running server holds its data dir
        result = CliRunner().invoke(app, ["serve", "--data-dir", str(held), "--port", "0"])
    message = (f"error: {held} is in use by another memsvc process (a server or an embedded command): stop it, or "
               "serve another --data-dir\n")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", message)
    assert sorted(p.name for p in held.iterdir()) == [".lock"]


def test_a_data_dir_this_process_holds_is_named_so(tmp_path):
    """DataDirInUse said "another memsvc process" when the holder was this one (and then advised --url)."""
    import os

    from typer.testing import CliRunner

    from memsvc.cli.commands import app
    from memsvc.store import Store

    store = Store(tmp_path)
    try:
        result = CliRunner().invoke(app, ["search", "x", "--collection", "c", "--data-dir", str(tmp_path)])
    finally:
        store.close()
    assert (result.exit_code, result.stdout, result.stderr) == (
        2, "", (f"error: {tmp_path} is already open in this process (pid {os.getpid()}): close the Store or "
                "Service that holds it before opening it again\n"))


def test_a_cuda_device_on_a_machine_without_cuda_is_one_line_before_the_model_loads(tmp_path):
    """`--device cuda` needs torch to know there is no GPU: refused with one line right after torch is imported,
    before transformers is imported, so before the model loads."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 20)
    data, held = tmp_path / "data", tmp_path / "held"
    cases = {
        ("generate", "hi", "--device", "cuda"):
            "error: device 'cuda' asked for, but torch sees no CUDA GPU here",
        ("generate", "hi", "--cache", "policy:h2o", "--device", "cuda:1"):
            "error: device 'cuda:1' asked for, but torch sees no CUDA GPU here",
        ("eval-long", str(doc), "--device", "cuda:0"):
            "error: device 'cuda:0' asked for, but torch sees no CUDA GPU here",
        ("train-gate", str(doc), "--out", str(tmp_path / "g.json"), "--device", "cuda"):
            "error: device 'cuda' asked for, but torch sees no CUDA GPU here",
    }
    report = probe(cases, data, held)
    for (args, expected), (code, stdout, stderr, _) in zip(cases.items(), report["results"]):
        assert (code, stdout, stderr.strip()) == (2, "", expected), (args, stderr)
    assert report["torch"] is True and report["transformers"] is False


def test_a_cuda_device_without_cuda_stops_knnlm_and_ask_before_the_model(tmp_path, monkeypatch):
    """The same through the commands that open the store first (knnlm build, eval; ask, embedded)."""
    import torch
    from typer.testing import CliRunner

    import lm.model
    from memsvc.cli.commands import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(lm.model, "load_model", lambda *args, **kwargs: pytest.fail("the model loaded"))
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world " * 20)
    data = str(tmp_path / "data")
    for args in (["knnlm", "build", str(doc), "--memory", "m", "--data-dir", data, "--device", "cuda"],
                 ["ask", "x", "--collection", "c", "--data-dir", data, "--device", "cuda"]):
        result = CliRunner().invoke(app, args)
        assert (result.exit_code, result.stdout, result.stderr) == (
            2, "", "error: device 'cuda' asked for, but torch sees no CUDA GPU here\n"), args
