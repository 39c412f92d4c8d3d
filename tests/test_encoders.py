"""retrievers.encoders: pooling and batching exactly, and the exported backends against PyTorch."""
import re
from pathlib import Path

import numpy as np
import pytest

from retrievers.encoders import ExportedEncoder, by_length, mean_pool


def test_mean_pool_averages_only_unmasked_tokens_and_normalises():
    hidden = np.array([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]], dtype=np.float32)  # last token is padding
    pooled = mean_pool(hidden, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(pooled, [[0.6, 0.8]], atol=1e-6)  # mean (1.5, 2.0), unit length


def test_by_length_batches_longest_first_and_covers_every_text_once():
    texts = ["a", "aaaa", "aa", "aaaaa", "aaa"]
    batches = by_length(texts, 2)
    assert batches == [[3, 1], [4, 2], [0]]
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backend_gives_the_pytorch_vectors(backend, tmp_path):
    pytest.importorskip("onnxruntime" if backend == "onnx" else "openvino")
    from retrievers.dense import SentenceEncoder, model_path

    texts = ["What is a generator?", "A function which returns a generator iterator. " * 40, "x"]
    reference = SentenceEncoder().encode(texts)
    exported = ExportedEncoder(model_path(), backend, cache_dir=tmp_path, batch_size=2)
    vectors = exported.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.min(np.sum(vectors * reference, axis=1)) > 0.9999  # the long text is cut at 256 tokens by both


# --- the service's embedder: backends by setting, names, fallback, the int8 build (issue 16 #2) -------------

def test_auto_is_torch_on_a_gpu_bf16_openvino_only_with_amx_else_int8(monkeypatch):
    from retrievers import encoders

    assert encoders.resolve_backend("auto", "cuda:0") == "torch"
    assert encoders.resolve_backend("openvino", "cuda") == "openvino"
    assert encoders.resolve_backend("openvino", "cpu", frozenset()) == "openvino"  # a setting is kept
    with pytest.raises(ValueError, match="embed backend must be one of auto, torch, openvino, openvino-int8"):
        encoders.resolve_backend("onnx", "cpu")
    amx = "flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8\n"
    no_amx = "flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni avx_vnni avx512_fp16\n"  # this Xeon (load 1.4)
    arm = "Features\t: fp asimd bf16 i8mm\n"
    assert encoders.cpu_flags("processor\t: 0\n" + amx + "processor\t: 1\n" + amx) >= {"amx_bf16", "avx512_bf16"}
    assert encoders.cpu_flags(arm) == frozenset()
    for cpuinfo, backend in [(amx, "openvino"), (no_amx, "openvino-int8"), (arm, "openvino-int8"),
                             ("", "openvino-int8")]:
        assert encoders.resolve_backend("auto", "cpu", encoders.cpu_flags(cpuinfo)) == backend, cpuinfo
    monkeypatch.setattr(encoders, "cpu_flags", lambda cpuinfo=None: frozenset({"amx_bf16"}))
    assert encoders.resolve_backend("auto", "cpu") == "openvino"  # the default reads cpu_flags()
    monkeypatch.setattr(encoders, "cpu_flags", lambda cpuinfo=None: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(encoders, "missing_packages", lambda backend: [])
    assert encoders.embedder_name("torch") == "all-MiniLM-L6-v2"
    assert encoders.embedder_name("auto", "cpu") == "all-MiniLM-L6-v2+openvino-int8"
    assert encoders.embedder_name("openvino") == "all-MiniLM-L6-v2+openvino"
    monkeypatch.setattr(encoders, "missing_packages", lambda backend: ["openvino"])
    assert encoders.embedder_name("auto", "cpu") == "all-MiniLM-L6-v2"  # what make_embedder falls back to


def test_openvino_float_says_what_openvino_runs_this_cpu_in():
    pytest.importorskip("openvino")
    from retrievers.encoders import openvino_float

    flags = set(Path("/proc/cpuinfo").read_text().split())
    precision = openvino_float()
    assert precision in ("bf16", "f16", "f32")
    if flags & {"avx512_bf16", "amx_bf16"}:  # this machine: OpenVINO runs bf16
        assert precision == "bf16"


def test_a_missing_openvino_falls_back_to_torch_with_one_warning_line(monkeypatch, caplog, tmp_path):
    from retrievers import encoders

    monkeypatch.setattr(encoders, "missing_packages", lambda backend: ["openvino", "nncf"])
    monkeypatch.setattr(encoders, "SentenceEncoder", lambda device=None: "the torch encoder")
    with caplog.at_level("WARNING", logger="retrievers.encoders"):
        encoder = encoders.make_embedder("all-MiniLM-L6-v2+openvino-int8", tmp_path)
    assert encoder == "the torch encoder"
    assert [r.getMessage() for r in caplog.records] == [
        ("the openvino-int8 embedder needs openvino and nncf, which this install lacks "
         "(pip install 'memsvc[openvino]'); embedding with PyTorch instead")]
    assert not any(tmp_path.iterdir())  # nothing exported


@pytest.mark.parametrize("name", ["bge-small-en-v1.5", "all-MiniLM-L6-v2+onnx", "all-MiniLM-L6-v2+"])
def test_an_embedder_this_memsvc_cannot_run_is_refused(name, tmp_path):
    from memsvc.contract import InvalidInput
    from retrievers.encoders import make_embedder

    with pytest.raises(InvalidInput, match=re.escape(f"unknown embedder '{name}': this memsvc runs all-MiniLM-L6-v2 ")) as err:
        make_embedder(name, tmp_path)
    assert err.value.field == "embedder"


def test_the_calibration_set_is_fixed_library_doc_chunks():
    from retrievers.encoders import CALIBRATION, calibration_texts

    texts = calibration_texts()
    assert len(texts) == 256 and len(set(texts)) == 256 and all(t.strip() for t in texts)
    assert CALIBRATION.stat().st_size < 100_000


@pytest.mark.slow
def test_int8_openvino_is_built_once_under_a_lock_and_embeds_close_to_pytorch(tmp_path, caplog):
    """The real openvino-int8 path (export, NNCF quantisation, OpenVINO) calibrated on 8 texts (the shipped
    256 give cosine 0.994 on average, bench/results/retrieval_v2.md section 7): vectors within cosine 0.98 of
    PyTorch's; a second encoder on the same cache loads the built model, silently."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from retrievers.dense import SentenceEncoder, model_path
    from retrievers.encoders import calibration_texts

    texts = ["What is a generator?", "How do I copy a file in Python?",
             ("A function which returns a generator iterator. It looks like a normal function except that it "
              "contains yield expressions for producing a series of values usable in a for-loop.")]
    with caplog.at_level("WARNING", logger="retrievers.encoders"):
        built = ExportedEncoder(model_path(), "openvino-int8", cache_dir=tmp_path, calibration=calibration_texts()[:8],
                                name="all-MiniLM-L6-v2")
    assert any(r.getMessage().startswith("building the int8 OpenVINO embedder") for r in caplog.records)
    assert built.name == "all-MiniLM-L6-v2+openvino-int8" and built.tokenizer("a b")["input_ids"] == [101, 1037, 1038, 102]
    vectors = built.encode(texts)
    cosines = np.sum(vectors * SentenceEncoder().encode(texts), axis=1)
    assert vectors.shape == (3, 384) and cosines.min() >= 0.98, cosines
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrievers.encoders"):
        loaded = ExportedEncoder(model_path(), "openvino-int8", cache_dir=tmp_path, calibration=calibration_texts()[:8])
    assert not caplog.records
    np.testing.assert_array_equal(loaded.encode(texts), vectors)
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # .lock aside
    assert len(files) == 3 and files[2] == "model.onnx", files
    assert re.fullmatch(r"model-int8-([0-9a-f]{12})\.bin", files[0]) and files[1] == files[0][:-4] + ".xml"


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_a_model_cache_that_cannot_be_written_falls_back_to_torch_with_one_warning_line(monkeypatch, caplog,
                                                                                          tmp_path, below):
    """MEMSVC_MODEL_CACHE naming a file (or a path under one) was a NotADirectoryError traceback at the first
    ingest; lm.model reads the GGUF directly in that case, the embedder runs in PyTorch."""
    from retrievers import encoders

    monkeypatch.setattr(encoders, "missing_packages", lambda backend: [])
    monkeypatch.setattr(encoders, "SentenceEncoder", lambda device=None: "the torch encoder")
    (tmp_path / "afile").write_text("not a directory")
    cache = tmp_path / "afile" / below
    with caplog.at_level("WARNING", logger="retrievers.encoders"):
        encoder = encoders.make_embedder("all-MiniLM-L6-v2+openvino", cache)
    assert encoder == "the torch encoder"
    message = (f"the openvino embedder cannot be exported into the model cache {cache} ([Errno 20] Not a directory: "
               f"'{cache / 'all-MiniLM-L6-v2'}'); embedding with PyTorch instead")
    assert [r.getMessage() for r in caplog.records] == [message]
    assert (tmp_path / "afile").read_text() == "not a directory"
