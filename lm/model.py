"""Load a causal LM and its tokenizer, offline: the bundled SmolLM2, a local HF directory, or a GGUF file.

A GGUF model is de-quantised and its tokenizer rebuilt only once per machine: the result is kept as a Hugging
Face directory (safetensors weights and config; tokenizer files) in the model cache (`model_cache_dir()`),
under the sha256 of the GGUF's bytes, and later loads read that. An entry is written to a temporary directory
and renamed into place, so no process ever reads a half-written one; one whose files no longer match its
manifest is rebuilt.

`tiny_llama()` builds a small random Llama with the SmolLM2 tokenizer, for fast unit tests.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.devices import resolve_device
from lm.model_source import SMOLLM2, SMOLLM2_PACKAGE, bundled_gguf, model_source  # noqa: F401 (re-exported)
from memsvc.config import get_settings
from memsvc.store.wal import fsync_dir

log = logging.getLogger(__name__)

def model_cache_dir() -> Path:
    """Where converted GGUF models are kept: `MEMSVC_MODEL_CACHE`, else `$XDG_CACHE_HOME/memsvc/models`,
    else `~/.cache/memsvc/models` (the XDG base directory convention). Safe to delete at any time."""
    return get_settings().model_cache_dir


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (about 0.3 s for SmolLM2's 98 MB GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file, fsync and rename: readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def gguf_sha256(gguf: Path, cache_dir: Path) -> str:
    """The sha256 of a GGUF file, hashed once and remembered in `cache_dir/gguf-sha256.json` by
    (resolved path, size, mtime in ns): a file changed in place has a new size or mtime and is hashed again."""
    stat, key = gguf.stat(), str(gguf.resolve())
    memo_path = cache_dir / "gguf-sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    seen = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(seen, dict) and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return seen["sha256"]
    digest = file_sha256(gguf)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_json(memo_path, memo)
    return digest


MANIFEST = "memsvc-manifest.json"
CACHE_FORMAT = 1


def _intact(entry: Path) -> bool:
    """Whether a cache entry holds every file its manifest lists, unchanged. A file whose size and mtime are
    as written is trusted; one with the right size but another mtime is hashed again."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT or not manifest.get("files"):
            return False
        for name, record in manifest["files"].items():
            stat = (entry / name).stat()
            if stat.st_size != record["size"]:
                return False
            if stat.st_mtime_ns != record["mtime_ns"] and file_sha256(entry / name) != record["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _build(entry: Path, write: Callable[[Path], None], source: dict[str, Any]) -> None:
    """Make `entry` by `write(directory)` into a temporary directory, a manifest of what it wrote (sizes,
    mtimes, sha256), fsync, and one rename. A file lock serialises builders of one entry: the second finds the
    first's result and returns. A damaged entry is moved aside before the new one takes its name."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _intact(entry):
            return
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            write(tmp)
            files = {}
            for path in sorted(tmp.iterdir()):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                stat = path.stat()
                files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
            _write_json(tmp / MANIFEST, {"format": CACHE_FORMAT, "source": source,
                                         "transformers": transformers.__version__, "files": files})
            fsync_dir(tmp)
            if entry.exists():
                damaged = entry.with_name(f".{entry.name}.damaged-{uuid.uuid4().hex}")
                entry.rename(damaged)
                shutil.rmtree(damaged, ignore_errors=True)
            tmp.rename(entry)
            fsync_dir(entry.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _save_tokenizer(gguf: Path) -> Callable[[Path], None]:
    return lambda directory: AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(directory)


def _save_model(gguf: Path) -> Callable[[Path], None]:
    """Every weight de-quantised to float32 (exact for every GGUF type; loads cast to the dtype asked for),
    also where transformers could keep them packed (with GGUF matmul kernels), which it cannot save."""
    return lambda directory: AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
        local_files_only=True).save_pretrained(directory)


def converted(gguf: Path, part: Literal["model", "tokenizer"], cache_dir: Path | None = None) -> Path | None:
    """The Hugging Face directory holding `part` of a GGUF model, converted on first use: under
    `cache_dir/<sha256 of the GGUF>/<part>-transformers-<version>` (a new transformers converts again).
    None, with a logged warning, when the cache cannot be used (e.g. a read-only directory); a GGUF that
    transformers cannot read raises what `from_pretrained` raises for it."""
    cache_dir = cache_dir if cache_dir is not None else model_cache_dir()
    try:
        digest = gguf_sha256(gguf, cache_dir)
        entry = cache_dir / digest / f"{part}-transformers-{transformers.__version__}"
        if not _intact(entry):
            write = _save_model(gguf) if part == "model" else _save_tokenizer(gguf)
            _build(entry, write, {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "sha256": digest})
        return entry
    except OSError as e:
        log.warning("model cache %s not usable (%s); reading %s directly", cache_dir, e, gguf)
        return None


@functools.cache
def load_tokenizer(name_or_path: str | Path = SMOLLM2, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (cached per process; a GGUF's through the model cache, see `converted`)."""
    directory, gguf = model_source(name_or_path)
    entry = converted(directory / gguf, "tokenizer", cache_dir) if gguf is not None else None
    if entry is not None:
        return AutoTokenizer.from_pretrained(entry, local_files_only=True)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)


def load_model(name_or_path: str | Path = SMOLLM2, dtype: str | torch.dtype | None = torch.float32,
               cache_dir: Path | None = None, device: str | torch.device | None = "cpu"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, in `dtype`; tokenizer), loaded once per process and argument tuple;
    never touches the network.

    `device` None picks `default_device()`, `dtype` None float32 on the CPU and bfloat16 on a GPU
    (`resolve_device`; InvalidInput for a device this machine lacks). GGUF weights are de-quantised once
    per machine into the model cache (`converted`; `cache_dir` defaults to `model_cache_dir()`), and every
    later load reads those safetensors, cast to `dtype`.
    """
    device, dtype = resolve_device(device, dtype)
    return _load_model(name_or_path, dtype, cache_dir, device)


@functools.cache
def _load_model(name_or_path: str | Path, dtype: torch.dtype, cache_dir: Path | None,
                device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    directory, gguf = model_source(name_or_path)
    entry = converted(directory / gguf, "model", cache_dir) if gguf is not None else None
    if entry is not None:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), load_tokenizer(name_or_path, cache_dir)


def tiny_llama(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               seed: int = 0, max_positions: int = 2048) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A small random-weight Llama (GQA, SmolLM2's vocabulary, `max_positions` trained positions) and SmolLM2's
    tokenizer, for unit tests."""
    tokenizer = load_tokenizer(SMOLLM2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer
