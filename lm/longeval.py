"""eval-long: perplexity of long documents decoded as one stream through a bounded cache (+ kNN memory),
and the needle-in-a-haystack trial that asks for a fact planted deep in a long prompt.

For window and sinks the semantics are those of token-by-token streaming decoding; `lm.cache.stream` runs
it in exact blocks, so the numbers are the same and the run is many times faster. The policies of
`lm.policies` run in blocks of 16 that shrink the cache to budget - 16 first (see there). Perplexity counts the tokens past the first
`skip` (by default 256), where every policy but full attention has started to forget.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.attention import attach
from lm.cache import BoundedCache, stream
from lm.cache_specs import check_lengths
from lm.gate import Gate
from lm.generate import encode_prompt, stop_token_ids, stream_tokens
from lm.memory_attention import KnnConfig
from lm.policies import Policy
from memsvc.contract import InvalidInput, MemoryBackend, NotFound

DEFAULT_SKIP = 256
NEEDLE = "The secret passphrase is {word}."
QUESTION = "What is the secret passphrase? Answer with the passphrase only."
PASSCODE_NEEDLE = "The secret passcode is {word}."  # word: 4 digits
PASSCODE_QUESTION = "What is the secret passcode? Answer with the 4-digit passcode only."


@dataclass
class StreamResult:
    """Next-token losses of one stream: nll[i] = -log p(token i+1 | tokens 0..i)."""

    nll: np.ndarray
    seconds: float
    peak_cache_entries: int

    def perplexity(self, skip: int = DEFAULT_SKIP) -> float:
        return math.exp(self.nll[skip:].mean()) if len(self.nll) > skip else math.nan


def evaluate_stream(model: PreTrainedModel, input_ids: torch.Tensor, policy: Policy, *,
                    knn: KnnConfig | None = None, memory: MemoryBackend | None = None, gate: Gate | None = None,
                    block: int | None = None, progress: str | None = None, session: str | None = None,
                    persist: bool = False) -> StreamResult:
    """Stream input_ids [1, n] through `policy` (and kNN memory when `knn` is given) and record every loss.
    With `progress` (a label), a tqdm bar of tokens done / n - 1 and tok/s on stderr. `session`, `persist`:
    the memory session to resume and whether to keep it (`lm.attention.attach`, `lm.sessions`)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise InvalidInput("a stream is one sequence of at least 2 tokens", "input_ids")
    cache = BoundedCache(model, policy)
    nll = []
    started = time.perf_counter()
    with attach(model, cache, knn, memory, gate, session, persist), torch.inference_mode(), \
            tqdm(total=input_ids.shape[1] - 1, unit="tok", desc=progress, disable=progress is None) as bar:
        for start, out in stream(model, input_ids[:, :-1], cache, block):
            q = out.logits.shape[1]
            targets = input_ids[0, start + 1:start + q + 1].to(out.logits.device)
            nll.append(torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="none"))
            bar.update(q)
    return StreamResult(torch.cat(nll).cpu().numpy(), time.perf_counter() - started, cache.peak_entries)


def read_tokens(tokenizer: PreTrainedTokenizerBase, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    """A text file's token ids [1, n], at most `max_tokens` of them."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no such file: {path}", "files")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text", "files") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise InvalidInput(f"{path} has fewer than 2 tokens", "files")
    return ids


def evaluate_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, files: list[str | Path],
                   policy: Policy, *, knn: KnnConfig | None = None, memory: MemoryBackend | None = None,
                   gate: Gate | None = None, max_tokens: int | None = None, skip: int = DEFAULT_SKIP,
                   progress: bool = False, session: str | None = None, persist: bool = False) -> dict:
    """eval-long over files (each its own stream and session): pooled perplexity, scored tokens, peak, tok/s.
    With `progress`, a tqdm bar per file on stderr. A `session` (resumed if the memory kept it, kept with
    `persist`) is one stream: one file only (InvalidInput)."""
    check_lengths(max_tokens, skip)
    if session is not None and len(files) != 1:
        raise InvalidInput(f"a session is one stream: give one file with a session, not {len(files)}", "files")
    streams = {str(f): read_tokens(tokenizer, f, max_tokens) for f in files}  # every file checked before work
    if not streams:
        raise InvalidInput("give at least one file", "files")
    longest = max(ids.shape[-1] for ids in streams.values())
    if longest - 1 <= skip:
        raise InvalidInput(f"no token to score past the first {skip} (skip): the longest file has {longest} "
                           f"tokens; give a smaller skip or longer files", "skip")
    results = {name: evaluate_stream(model, ids, policy, knn=knn, memory=memory, gate=gate,
                                     progress=Path(name).name if progress else None, session=session,
                                     persist=persist)
               for name, ids in streams.items()}
    scored = np.concatenate([r.nll[skip:] for r in results.values()])
    processed = sum(len(r.nll) for r in results.values())
    return {
        "perplexity": math.exp(scored.mean()) if len(scored) else math.nan,
        "tokens": len(scored),
        "peak_cache_entries": max(r.peak_cache_entries for r in results.values()),
        "tokens_per_s": processed / sum(r.seconds for r in results.values()),
        "files": [{"file": name, "tokens": len(r.nll), "perplexity": r.perplexity(skip)}
                  for name, r in results.items()],
    }


def needle_text(tokenizer: PreTrainedTokenizerBase, haystack: str, tokens: int, depth: float,
                word: str, needle: str = NEEDLE, question: str = QUESTION) -> str:
    """The needle trial's user turn: about `tokens` tokens of haystack (repeated if short), the needle (`needle` with
    `word` in it) planted at the line nearest `depth` (0 = start, 1 = end), then the question. InvalidInput for a
    depth outside [0, 1]. Plain text, so `memsvc generate --prompt-file` can run the same trial."""
    if not 0 <= depth <= 1:
        raise InvalidInput(f"depth must be in [0, 1], got {depth}", "depth")
    ids = tokenizer(haystack).input_ids
    while len(ids) < tokens:
        ids = ids + ids
    lines = tokenizer.decode(ids[:tokens]).split("\n")
    at = round(depth * len(lines))
    text = "\n".join(lines[:at] + [needle.format(word=word)] + lines[at:])
    return f"{text}\n\n{question}"


def needle_prompt(tokenizer: PreTrainedTokenizerBase, haystack: str, tokens: int, depth: float,
                  word: str, needle: str = NEEDLE, question: str = QUESTION) -> torch.Tensor:
    """Chat prompt ids [1, n] of `needle_text` (one user turn in the tokenizer's chat template)."""
    return encode_prompt(tokenizer, needle_text(tokenizer, haystack, tokens, depth, word, needle, question), chat=True)


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: torch.Tensor,
           policy: Policy, *,
           knn: KnnConfig | None = None, memory: MemoryBackend | None = None, gate: Gate | None = None,
           max_new_tokens: int = 12) -> str:
    """Greedy answer to a prompt streamed through a bounded cache by the one decoding loop
    (`lm.generate.stream_tokens`, which prefills the prompt in exact blocks)."""
    cache = BoundedCache(model, policy)
    with attach(model, cache, knn, memory, gate):
        tokens = list(stream_tokens(model, prompt, max_new_tokens=max_new_tokens, cache=cache,
                                    stop_ids=stop_token_ids(model, tokenizer)))
    return tokenizer.decode(tokens, skip_special_tokens=True)
