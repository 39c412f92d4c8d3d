"""retrievers.encoders: pooling and batching exactly, and the exported backends against PyTorch."""
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
    pytest.importorskip("onnxruntime")
    if backend == "openvino":
        pytest.importorskip("openvino")
    from retrievers.dense import SentenceEncoder, model_path

    texts = ["What is a generator?", "A function which returns a generator iterator. " * 40, "x"]
    reference = SentenceEncoder().encode(texts)
    exported = ExportedEncoder(model_path(), backend, cache_dir=tmp_path, batch_size=2)
    vectors = exported.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.min(np.sum(vectors * reference, axis=1)) > 0.9999  # the long text is cut at 256 tokens by both
