"""The one decoding loop: kNN-LM, RAG and bounded-cache generation all decode through `stream_tokens`.

Each step runs the model on the new tokens, turns the last position's logits into log-probabilities,
lets an optional `LogprobsHook` replace them, then picks the next token (greedy, or sampled with
temperature and top-p). `generate` wraps it with tokenisation, an optional chat template, and
incremental detokenisation, yielding text pieces as they decode.

The hook sees the step's full model outputs, and whatever forward hooks it registered on the model
captured during that same forward pass (kNN-LM reads its key vector that way), so it never reruns the
model. With `cache` given (any transformers `Cache`, e.g. a bounded one from `lm.cache`),
the model reads and updates that cache, and positions follow its `get_seq_length()`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.cache import forward
from lm.knn_params import check_sampling
from memsvc.contract import InvalidInput


class LogprobsHook(Protocol):
    """Replaces the next-token log-probabilities [batch, vocab] of one decoding step."""

    def __call__(self, logprobs: torch.Tensor, outputs: CausalLMOutputWithPast) -> torch.Tensor: ...


def next_token(logprobs: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [batch]: argmax when temperature is 0, else a sample from the top-p nucleus."""
    if temperature == 0:
        return logprobs.argmax(-1)
    probs = torch.softmax(logprobs / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_tokens(model: PreTrainedModel, input_ids: torch.Tensor, *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                  cache: Cache | None = None, logprobs_hook: LogprobsHook | None = None,
                  seed: int | None = None) -> Iterator[int]:
    """Yield the next token ids of a single sequence `input_ids` [1, n] as they are decoded.

    Stops after `max_new_tokens` or after yielding one of `stop_ids`. The prompt is one prefill (`lm.cache.forward`:
    with a `BoundedCache`, in its exact blocks, as `model.generate` runs it too), then one forward per token.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None  # where logits are
    if max_new_tokens == 0:
        return
    outputs = forward(model, input_ids.to(model.device), cache, logits_to_keep=1)
    for step in range(1, max_new_tokens + 1):
        cache = outputs.cache
        logprobs = torch.log_softmax(outputs.logits[:, -1].float(), dim=-1)
        if logprobs_hook is not None:
            logprobs = logprobs_hook(logprobs, outputs)
        token = next_token(logprobs, temperature, top_p, generator)
        yield int(token)
        if int(token) in stop_ids or step == max_new_tokens:
            return
        outputs = model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = False,
                  system: str | None = None) -> torch.Tensor:
    """Prompt ids [1, n]; with `chat`, wrapped in the tokenizer's chat template as one user turn."""
    if not prompt:
        raise InvalidInput("the prompt is empty", "prompt")
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if tokenizer.chat_template is None:
        raise InvalidInput("this model's tokenizer has no chat template", "chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([ids])


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, chat: bool = False,
             system: str | None = None, cache: Cache | None = None,
             logprobs_hook: LogprobsHook | None = None, seed: int | None = None) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces (see `stream_tokens` for the options).

    A piece is yielded once its bytes decode to whole characters; special tokens are not shown.
    """
    input_ids = encode_prompt(tokenizer, prompt, chat, system)
    generated: list[int] = []
    shown = ""
    for token in stream_tokens(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, stop_ids=stop_token_ids(model, tokenizer),
                               cache=cache, logprobs_hook=logprobs_hook, seed=seed):
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
