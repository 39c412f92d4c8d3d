"""The model cache (lm/model.py): a GGUF is converted once into safetensors + tokenizer files, keyed by its
sha256; later loads read that copy and give the same logits; a damaged copy is rebuilt; builders never expose
a half-written one. On a tiny GGUF written here (a random 2-layer Llama with a byte-level BPE tokenizer of
266 tokens, Q8_0 weights like SmolLM2's embeddings), so each conversion takes well under a second."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lm.model as model_module
from lm.model import MANIFEST, _build, _intact, _load_model, converted, gguf_sha256, load_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the cat sat in the hat, and then the bat"
CPU = torch.device("cpu")


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others move past 255."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


def write_tiny_gguf(path, seed: int = 0) -> LlamaForCausalLM:
    """Write a random tiny Llama as a GGUF file (2-D weights Q8_0, norms F32) and return the model."""
    tokens = SPECIAL + byte_symbols() + [m.replace(" ", "") for m in MERGES]
    heads, kv_heads = 4, 2
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(64 // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))  # 3: control tokens
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings, as in SmolLM2
            continue
        data = tensor.numpy().astype(np.float32)
        for proj, n in {"q_proj": heads, "k_proj": kv_heads}.items():
            if proj in name:  # llama.cpp's rotary layout, which transformers undoes when it reads the file
                data = data.reshape(n, 2, data.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(data.shape)
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if data.ndim == 2:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def logits(model, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokenizer(TEXT, return_tensors="pt").input_ids).logits


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the GGUF, the random model it holds, the model transformers reads from it directly)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    reference = write_tiny_gguf(path)
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return path, reference, direct


def loads_from(monkeypatch) -> list[tuple[str, str | None]]:
    """Record (directory, gguf_file) of every model and tokenizer load lm.model makes from now on."""
    calls: list[tuple[str, str | None]] = []
    for auto in (model_module.AutoModelForCausalLM, model_module.AutoTokenizer):
        original = auto.from_pretrained

        def spy(source, *args, _original=original, **kwargs):
            calls.append((str(source), kwargs.get("gguf_file")))
            return _original(source, *args, **kwargs)
        monkeypatch.setattr(auto, "from_pretrained", spy)
    return calls


def entry_of(cache_dir, path, part: str):
    return cache_dir / gguf_sha256(path, cache_dir) / f"{part}-transformers-{model_module.transformers.__version__}"


def test_the_tiny_gguf_holds_its_model(tiny_gguf):
    """The test file is a faithful GGUF: read back directly, it gives the random model's logits up to Q8_0."""
    path, reference, direct = tiny_gguf
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert torch.allclose(logits(direct, tok), logits(reference, tok), atol=0.05)


def test_second_load_reads_the_cache_and_gives_identical_logits(tiny_gguf, tmp_path, monkeypatch):
    path, _, direct = tiny_gguf
    direct_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    calls = loads_from(monkeypatch)
    first, first_tok = _load_model.__wrapped__(path, torch.float32, tmp_path, CPU)
    converted_from_gguf = [c for c in calls if c[1] is not None]
    assert sorted(converted_from_gguf) == sorted([(str(path.parent), path.name)] * 2)  # model + tokenizer, once
    model_entry, tok_entry = entry_of(tmp_path, path, "model"), entry_of(tmp_path, path, "tokenizer")
    assert (model_entry / "model.safetensors").is_file() and (tok_entry / "tokenizer.json").is_file()
    assert json.loads((model_entry / MANIFEST).read_text())["source"]["sha256"] == model_module.file_sha256(path)

    calls.clear()
    load_tokenizer.cache_clear()
    second, second_tok = _load_model.__wrapped__(path, torch.float32, tmp_path, CPU)
    assert calls == [(str(model_entry), None), (str(tok_entry), None)]  # nothing read from the GGUF
    expected = logits(direct, direct_tok)
    assert torch.equal(logits(first, first_tok), expected)
    assert torch.equal(logits(second, second_tok), expected)
    assert second_tok(TEXT).input_ids == direct_tok(TEXT).input_ids
    chat = [{"role": "user", "content": "hi there"}]
    assert second_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert second.generation_config.eos_token_id == direct.generation_config.eos_token_id == 2
    assert not hasattr(second.config, "quantization_config")
    bf16, _ = _load_model.__wrapped__(path, torch.bfloat16, tmp_path, CPU)  # the float32 copy, cast on load
    assert bf16.dtype == torch.bfloat16
    load_tokenizer.cache_clear()


def test_a_damaged_cache_entry_is_rebuilt(tiny_gguf, tmp_path, monkeypatch):
    path, _, direct = tiny_gguf
    _load_model.__wrapped__(path, torch.float32, tmp_path, CPU)
    weights = entry_of(tmp_path, path, "model") / "model.safetensors"
    with open(weights, "r+b") as f:  # a copy cut short, e.g. by a full disk
        f.truncate(weights.stat().st_size // 2)
    calls = loads_from(monkeypatch)
    load_tokenizer.cache_clear()
    model, tok = _load_model.__wrapped__(path, torch.float32, tmp_path, CPU)
    assert (str(path.parent), path.name) in calls  # converted again
    assert torch.equal(logits(model, tok), logits(direct, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)))
    assert _intact(weights.parent)
    assert [p.name for p in weights.parent.parent.iterdir() if ".damaged-" in p.name or ".tmp-" in p.name] == []
    load_tokenizer.cache_clear()


def damage(entry, how: str) -> None:
    """Damage one cache entry, as a later writer or the disk would (so file times move on, as they do)."""
    files = {"manifest": entry / MANIFEST, "weights": entry / "model.safetensors", "config": entry / "config.json"}
    if how == "no manifest":
        files["manifest"].unlink()
    elif how == "garbage manifest":
        files["manifest"].write_text("{not json")
    elif how == "other format":
        manifest = json.loads(files["manifest"].read_text())
        files["manifest"].write_text(json.dumps({**manifest, "format": 0}))
    elif how == "missing config":
        files["config"].unlink()
    elif how == "truncated weights":
        os.truncate(files["weights"], files["weights"].stat().st_size - 1)
    elif how == "weights overwritten in place":
        stat = files["weights"].stat()
        with open(files["weights"], "r+b") as f:
            f.seek(stat.st_size // 2)
            f.write(b"\x7f" * 16)
        os.utime(files["weights"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["no manifest", "garbage manifest", "other format", "missing config",
                                 "truncated weights", "weights overwritten in place"])
def test_each_kind_of_damage_is_detected(tiny_gguf, tmp_path, how):
    path, _, _ = tiny_gguf
    entry = converted(path, "model", tmp_path)
    assert _intact(entry)
    damage(entry, how)
    assert not _intact(entry)


def test_a_touched_but_unchanged_file_is_still_intact(tiny_gguf, tmp_path):
    """A new mtime alone (a copy, a restore) costs a re-hash, not a rebuild."""
    path, _, _ = tiny_gguf
    entry = converted(path, "model", tmp_path)
    weights = entry / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    assert _intact(entry)


def test_the_gguf_hash_is_remembered_by_path_size_and_mtime(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    digest = gguf_sha256(copy, tmp_path / "cache")
    assert digest == model_module.file_sha256(path)
    hashed = []
    real = model_module.file_sha256
    monkeypatch.setattr(model_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert gguf_sha256(copy, tmp_path / "cache") == digest and hashed == []  # remembered
    with open(copy, "ab") as f:  # the file changes: a new size, a new hash
        f.write(b"\0")
    assert gguf_sha256(copy, tmp_path / "cache") != digest and hashed == [copy]


def test_concurrent_builders_convert_once_and_never_expose_a_half_written_entry(tmp_path):
    entry = tmp_path / "abc" / "model-x"
    writes, seen_partial, done = [], [], threading.Event()

    def slow_write(directory):
        writes.append(directory)
        (directory / "a.bin").write_bytes(b"a" * 1000)
        time.sleep(0.3)
        (directory / "b.bin").write_bytes(b"b" * 1000)

    def watch():
        while not done.is_set():
            if entry.exists() and not ((entry / MANIFEST).exists() and (entry / "b.bin").exists()):
                seen_partial.append(sorted(p.name for p in entry.iterdir()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    builders = [threading.Thread(target=_build, args=(entry, slow_write, {})) for _ in range(3)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    done.set()
    watcher.join()
    assert len(writes) == 1 and seen_partial == []
    assert _intact(entry) and sorted(p.name for p in entry.iterdir()) == ["a.bin", "b.bin", MANIFEST]
    assert [p.name for p in entry.parent.iterdir() if ".tmp-" in p.name] == []


def test_a_builder_killed_half_way_leaves_nothing_visible(tmp_path):
    entry = tmp_path / "abc" / "model-x"

    def crash(directory):
        (directory / "a.bin").write_bytes(b"a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(entry, crash, {})
    assert not entry.exists() and not _intact(entry)
    _build(entry, lambda d: (d / "a.bin").write_bytes(b"ok"), {})
    assert (entry / "a.bin").read_bytes() == b"ok" and _intact(entry)


def test_an_unusable_cache_directory_falls_back_to_the_gguf(tiny_gguf, tmp_path, caplog):
    path, _, _ = tiny_gguf
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, logger="lm.model"):
        assert converted(path, "model", not_a_dir / "cache") is None
    assert "not usable" in caplog.text


def test_the_cache_directory_follows_the_settings(monkeypatch, tmp_path):
    from memsvc.config import get_settings
    monkeypatch.delenv("MEMSVC_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    get_settings.cache_clear()
    assert model_module.model_cache_dir() == tmp_path / "xdg" / "memsvc" / "models"
    monkeypatch.setenv("MEMSVC_MODEL_CACHE", str(tmp_path / "mine"))
    get_settings.cache_clear()
    assert model_module.model_cache_dir() == tmp_path / "mine"
    get_settings.cache_clear()
