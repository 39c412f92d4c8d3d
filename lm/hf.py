"""Hugging Face entry points: `model.generate`, pipelines and plain forwards with a memsvc cache made for you.

    with bounded_cache(model, "window:256,sinks:4"):       # any policy: "policy:h2o,budget:260", a Policy
        out = model.generate(ids, max_new_tokens=64)
    with memory_attention(model, window=256, sinks=4):     # + kNN-memory attention over what the window drops
        out = model.generate(ids, max_new_tokens=64)

While one is open, every forward of the model that starts a sequence (no cache, or an empty one such as the
`DynamicCache` that `generate` makes) gets a fresh `BoundedCache` of the policy, and a forward that brings a
BoundedCache continues it. Each sequence is wired with `lm.attention.attach` (attention reported to policies
that rank by it, kNN-memory attention with its own session of `memory`); the wiring and the memory session
end when the next sequence starts or the block closes. A BoundedCache runs any forward in exact blocks at its
own positions (`lm.cache.exact_forward`), so `generate` gives the tokens of memsvc's own loop
(`lm.generate.stream_tokens`) with the same cache: greedy, and sampling with the same seed.

The shape follows NVIDIA kvpress (`with press(model): model(...)`), whose presses are forward hooks that
compress a `DynamicCache` after a full-attention prefill. Here the cache is bounded from the first token,
prefill included. transformers 5 names its cache implementations in a closed list (`cache_implementation=`
accepts only its own), so the cache comes in through the forward instead.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from lm.attention import attach
from lm.blocks import check_block_config
from lm.cache import BoundedCache
from lm.gate import Gate
from lm.memory_attention import KnnConfig, KnnMemoryAttention, Mode, check_config, session_memory
from lm.policies import DEFAULT_SINKS, DEFAULT_WINDOW, Policy, Window, parse_cache_spec
from memsvc.contract import InvalidInput, MemoryBackend

OPEN = "_memsvc_bounded_cache"  # set on a model while a `bounded_cache` block is open on it
CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5's name for the cache argument, then the old one


class BoundedSequences:
    """What `bounded_cache` yields: the cache and memory session of the current (latest) sequence."""

    def __init__(self, model: PreTrainedModel, policy: Policy, period: int | None, knn: KnnConfig | None,
                 memory: MemoryBackend | None, gate: Gate | None):
        self.model, self.policy, self.period = model, policy, period
        self.knn, self.memory, self.gate = knn, memory, gate
        self.cache: BoundedCache | None = None  # the current sequence's cache
        self.session: KnnMemoryAttention | None = None  # its kNN-memory session (with memory attention)
        self.sequences = 0  # sequences started
        self.wiring = ExitStack()
        parameters = inspect.signature(model.forward).parameters
        self.argument = next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])

    def start(self, cache: BoundedCache) -> None:
        """Make `cache` the current sequence: end the previous one's wiring (and memory session), wire this one."""
        self.end()
        self.session = self.wiring.enter_context(attach(self.model, cache, self.knn, self.memory, self.gate))
        self.cache = cache
        self.sequences += 1

    def end(self) -> None:
        self.wiring.close()
        self.session = None

    def before_forward(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The forward pre-hook: hand the forward the current sequence's cache, or a new sequence's."""
        given = [value for value in (kwargs.pop(name, None) for name in CACHE_ARGUMENTS) if value is not None]
        given = given[0] if given else None
        if isinstance(given, BoundedCache):
            cache = given
        elif given is None or (isinstance(given, Cache) and given.get_seq_length() == 0):
            cache = BoundedCache(self.model, self.policy, self.period)
        else:
            raise InvalidInput(f"inside bounded_cache a forward takes no cache, an empty one, or a BoundedCache; "
                               f"got a {type(given).__name__} that already holds a sequence", "cache")
        if cache is not self.cache:
            self.start(cache)
        kwargs[self.argument] = cache
        return args, kwargs


@contextmanager
def bounded_cache(model: PreTrainedModel, policy: Policy | str = f"window:{DEFAULT_WINDOW},sinks:{DEFAULT_SINKS}",
                  *, period: int | None = None, knn: KnnConfig | None = None, memory: MemoryBackend | None = None,
                  gate: Gate | None = None) -> Iterator[BoundedSequences]:
    """While open, `model` (a causal LM) runs every sequence through a fresh `BoundedCache` of `policy`.

    `policy`: an `lm.policies` policy or a cache spec ("window:256,sinks:4", "policy:h2o,budget:260", ...;
    `lm.policies.parse_cache_spec`). With `knn`, the chosen layers also attend to what the cache evicts,
    kept in `memory` (default: a RAM-only memory per sequence; any `MemoryBackend`, e.g. a `RemoteMemory`),
    each sequence in its own session of partitions, deleted when it ends. `period` and `gate`: see
    `BoundedCache` and `lm.attention.attach`. Batches of one sequence (memory attention, attention-ranked
    policies) or of unpadded ones. Yields a `BoundedSequences` (the current cache and session).
    InvalidInput before anything changes: a bad policy, period or memory config, or a block already open on
    this model.
    """
    policy = parse_cache_spec(policy) if isinstance(policy, str) else policy
    if getattr(model, OPEN, False):
        raise InvalidInput("a bounded_cache block is already open on this model", "model")
    probe = BoundedCache(model, policy, period)  # checks the policy and period against the model
    if knn is not None and knn.blocks:
        knn = check_block_config(model, probe, knn, gate)
    elif knn is not None:
        knn = check_config(model, probe, session_memory(model) if memory is None else memory, knn, gate)
    sequences = BoundedSequences(model, policy, period, knn, memory, gate)
    hook = model.register_forward_pre_hook(sequences.before_forward, with_kwargs=True)
    setattr(model, OPEN, True)
    try:
        yield sequences
    finally:
        hook.remove()
        delattr(model, OPEN)
        sequences.end()


def memory_attention(model: PreTrainedModel, window: int = DEFAULT_WINDOW, sinks: int = DEFAULT_SINKS, *,
                     memory: MemoryBackend | None = None, k: int = 32, layers: list[int] | None = None,
                     mode: Mode = "joint", gate: Gate | None = None,
                     policy: Policy | str | None = None) -> AbstractContextManager[BoundedSequences]:
    """`bounded_cache` with kNN-memory attention: a window of `window` tokens plus `sinks` (or `policy`), and
    at `layers` (default: all) the top-k of the evicted entries, retrieved from `memory` (see
    `lm.memory_attention`). A context manager; InvalidInput as `bounded_cache`."""
    return bounded_cache(model, Window(window, sinks) if policy is None else policy,
                         knn=KnnConfig(blocks=0, layers=layers, k=k, mode=mode), memory=memory, gate=gate)
