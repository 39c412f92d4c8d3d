"""Shared fixtures: a real `memsvc serve` subprocess on a free port (`ServerProcess`, `server`), one torch
thread, and a tiny random sentence encoder (`tiny_encoder`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# servers and services of the tests embed in PyTorch: the int8 OpenVINO embedder (the CPU default) takes minutes
# to build once; tests/test_encoders.py builds it from a few texts
os.environ.setdefault("MEMSVC_EMBED_BACKEND", "torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`memsvc serve` on `data_dir` in a subprocess; `env` adds MEMSVC_* settings. Restartable on the same
    data dir and port: `start()` after `kill()` (SIGKILL) or `stop()` (SIGTERM, a clean shutdown)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        # the model of ask loads on the first ask, not at every test server's start
        self.env = {"MEMSVC_PRELOAD_MODEL": "false", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        """Start the server and return once /v1/health answers (or fail with the server's log)."""
        cmd = [sys.executable, "-m", "memsvc.cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        return self.wait_healthy(f"{self.url}/v1/health", timeout)

    def wait_healthy(self, url: str, timeout: float) -> Self:
        """Return once GET url answers 200 (or fail with the server's log, after killing it on a timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"server did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no snapshot; what is on disk is all a restart gets."""
        self._end(signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: uvicorn shuts down cleanly and the store snapshots its memories."""
        self._end(signal.SIGTERM, timeout)

    def _end(self, sig: signal.Signals, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models decode token by token; one torch thread avoids oversubscribing small CI machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server on a fresh data dir, shared by a test module (use unique memory names)."""
    with ServerProcess(tmp_path_factory.mktemp("server") / "data") as proc:
        yield proc


def talking_llama(seed: int = 2):
    """`lm.model.tiny_llama` with an untied random output layer: the tied random model echoes the prompt's
    last token ("\n" after a chat template) over and over, this one says varied tokens (seed 2, after a RAG
    prompt: ' Rog', ' bowls', ' bb', ...), so that streamed answers have pieces to compare."""
    import torch

    from lm.model import tiny_llama

    model, tokenizer = tiny_llama()
    generator = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A real SentenceTransformer with the MiniLM tokenizer, but a 1-layer random BERT: fast,
    deterministic, not semantic. What the retriever, collection and RAG unit tests embed with."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retrievers.dense import SentenceEncoder, model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    modules = [Transformer(str(path), max_seq_length=256), Pooling(32)]
    return SentenceEncoder(SentenceTransformer(modules=modules, device="cpu"))


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus standalone server (PyPI `milvus` 2.3.5, see tests/milvus_server.py) shared by the
    session, stopped at its end, also after failures. Skipped where the package is not installed,
    unless MEMSVC_TEST_MILVUS_VENV names it (as `make test` does): then its absence is a failure."""
    from milvus_server import MilvusServer, available

    why = available()
    if why:
        (pytest.fail if os.environ.get("MEMSVC_TEST_MILVUS_VENV") else pytest.skip)(why)
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server")).start()
    try:
        yield server
    finally:
        server.stop(timeout=5)
