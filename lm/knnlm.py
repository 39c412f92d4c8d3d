"""kNN-LM (Khandelwal et al. 2020): p(y|x) = λ·p_kNN(y|x) + (1−λ)·p_LM(y|x), computed in log space.

The datastore is any `MemoryBackend` with value_kind "token": key = a hidden state of the context
(`final-norm`: the final norm's output; `mlp-input`: the normalised input of the last layer's MLP, as in
the paper), value = the token that came next. p_kNN puts softmax(−distance / temperature) weight on each
of the k nearest keys and sums the weights per token id.

Texts are cut into windows of `window` tokens; window j reads tokens [jW, jW+W) and predicts each next
token, so every token but a document's first is predicted exactly once. Keys are captured with forward
hooks during the one forward pass that also gives p_LM.

What a datastore was built with and the tuned (λ, temperature, k) live in the memory's metadata under
"knnlm" as one `DatastoreState`, so evaluation and generation default to them. A build writes it once per
finished document (which documents are in, how many entries they made, which one is being added next);
an interrupted build resumes from the memory's entry count.
"""
from __future__ import annotations

import hashlib
import math
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.generate import LogprobsHook, generate
from lm.knn_params import KNNParams
from memsvc.contract import IndexKind, InvalidInput, MemoryBackend

KeyKind = Literal["final-norm", "mlp-input"]
DEFAULT_KEY: KeyKind = "mlp-input"  # lower perplexity than final-norm at every datastore size (bench/results/knnlm.md)
KEY_KINDS: tuple[str, ...] = get_args(KeyKind)
METADATA_KEY = "knnlm"


class DatastoreState(BaseModel):
    """What a datastore was built with and tuned to: the memory's metadata under METADATA_KEY.

    Its keys are those of the free-form dict earlier builds wrote, so datastores built before it read as
    they are; keys it does not know are kept.
    """

    model_config = ConfigDict(extra="allow")

    key: KeyKind | None = None  # the hidden state used as key
    window: int | None = None  # tokens per forward when the keys were made
    sources: list[str] = Field(default_factory=list)  # `text_id` of every finished document
    entries: int = 0  # entries the finished documents made (the rest of the memory: the document being added)
    building: str | None = None  # `text_id` of the document being added
    lam: float | None = None  # tuned settings (`KNNLM.tune`), None until tuned
    temp: float | None = None
    k: int | None = None
    tuned_on_tokens: int | None = None
    tuned_base_ppl: float | None = None
    tuned_knnlm_ppl: float | None = None
    tuned_continuous: bool | None = None

    @classmethod
    def of(cls, memory: MemoryBackend) -> DatastoreState:
        """The state stored with `memory` (empty for a new memory); InvalidInput if it is not one."""
        try:
            return cls.model_validate(memory.spec.metadata.get(METADATA_KEY, {}))
        except ValidationError as exc:
            raise InvalidInput(f"memory '{memory.spec.name}' has metadata '{METADATA_KEY}' that is not a kNN-LM "
                               f"datastore's: {exc.errors()[0]['msg']}", "memory") from None

    def save(self, memory: MemoryBackend) -> None:
        """Store this state with `memory` (one metadata write; the memory's other metadata stays)."""
        memory.set_metadata({**memory.spec.metadata, METADATA_KEY: self.model_dump(mode="json", exclude_none=True)})


# --- the math ------------------------------------------------------------------------------------

def knn_probs(distances: torch.Tensor, tokens: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """p_kNN [n, vocab] from neighbour distances and token ids [n, k] (missing: id -1, distance +inf)."""
    weights = torch.softmax(-distances.float() / temperature, dim=-1).nan_to_num(0.0)  # no neighbour: 0
    weights = weights.masked_fill(tokens < 0, 0.0)
    return torch.zeros(len(tokens), vocab_size, device=weights.device).scatter_add_(1, tokens.clamp(min=0), weights)


def interpolate(lm_logprobs: torch.Tensor, knn_logprobs: torch.Tensor, lam: float) -> torch.Tensor:
    """log(λ·p_kNN + (1−λ)·p_LM) from the two log-probabilities, without leaving log space."""
    lam = torch.tensor(lam, dtype=torch.float64, device=lm_logprobs.device)
    return torch.logaddexp(knn_logprobs + lam.log().float(), lm_logprobs + torch.log1p(-lam).float())


# --- keys ----------------------------------------------------------------------------------------

def check_key(kind: str) -> str:
    if kind not in KEY_KINDS:
        raise InvalidInput(f"key must be one of {', '.join(KEY_KINDS)}, got {kind!r}", "key")
    return kind


def key_hooks(model: PreTrainedModel, kinds: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[RemovableHandle]]:
    """(captured, handles): forward hooks that leave each forward pass's key hidden states [batch, seq, hidden]
    in `captured` until the handles are removed."""
    for kind in kinds:
        check_key(kind)
    decoder = model.get_decoder()
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for kind in kinds:
        if kind == "final-norm":
            handles.append(decoder.norm.register_forward_hook(
                lambda mod, args, out, kind=kind: captured.__setitem__(kind, out)))
        else:
            handles.append(decoder.layers[-1].mlp.register_forward_pre_hook(
                lambda mod, args, kind=kind: captured.__setitem__(kind, args[0])))
    return captured, handles


@contextmanager
def capture_keys(model: PreTrainedModel, kinds: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward pass leaves its key hidden states [batch, seq, hidden] in the dict."""
    captured, handles = key_hooks(model, kinds)
    try:
        yield captured
    finally:
        _remove(handles)


def _remove(handles: Sequence[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


@dataclass
class Encoded:
    """One document through the model: per predicted position its keys, next token and log p_LM."""

    keys: dict[str, np.ndarray]
    targets: np.ndarray
    lm_logprobs: np.ndarray | None


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text; InvalidInput if there are none or a text has fewer than two tokens."""
    if not texts:
        raise InvalidInput("no texts given", "texts")
    docs = [tokenizer(text).input_ids if isinstance(text, str) else [] for text in texts]
    for i, ids in enumerate(docs):
        if len(ids) < 2:
            raise InvalidInput(f"text {i} has {len(ids)} token(s): nothing to predict", "texts")
    return docs


@torch.inference_mode()
def encode(model: PreTrainedModel, docs: Sequence[Sequence[int]], kinds: Sequence[str] = ("final-norm",),
           window: int = 512, batch_size: int = 2, progress: bool = True,
           logprobs: bool = True) -> Iterator[Encoded]:
    """Run tokenised documents through the model in batches of windows; yield each document when done.

    Without `logprobs` only the decoder runs (no LM head): all a datastore build needs.
    """
    spans = [(d, start) for d, ids in enumerate(docs) for start in range(0, len(ids) - 1, window)]
    parts: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]] = []
    bar = tqdm(total=sum(len(ids) - 1 for ids in docs), unit="tok", disable=not progress, desc="kNN-LM encode")
    with capture_keys(model, kinds) as captured:
        for first in range(0, len(spans), batch_size):
            batch = spans[first:first + batch_size]
            chunks = [docs[d][start:start + window + 1] for d, start in batch]
            width = max(len(c) for c in chunks) - 1
            inputs = torch.zeros(len(chunks), width, dtype=torch.long)  # right padding: causal, never attended
            targets = torch.full((len(chunks), width), -100, dtype=torch.long)
            for row, chunk in enumerate(chunks):
                inputs[row, :len(chunk) - 1] = torch.tensor(chunk[:-1])
                targets[row, :len(chunk) - 1] = torch.tensor(chunk[1:])
            if logprobs:
                logits = model(input_ids=inputs.to(model.device), use_cache=False).logits.float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.to(model.device),
                                                        reduction="none").cpu().numpy()
            else:
                model.get_decoder()(input_ids=inputs.to(model.device), use_cache=False)
            for row, (d, start) in enumerate(batch):
                n = len(chunks[row]) - 1
                parts.append(({kind: captured[kind][row, :n].float().cpu().numpy() for kind in kinds},
                              targets[row, :n].numpy(), -nll[row, :n] if logprobs else None))
                bar.update(n)
                if start + window >= len(docs[d]) - 1:  # the document's last window
                    yield Encoded(keys={kind: np.concatenate([p[0][kind] for p in parts]) for kind in kinds},
                                  targets=np.concatenate([p[1] for p in parts]),
                                  lm_logprobs=np.concatenate([p[2] for p in parts]) if logprobs else None)
                    parts = []
    bar.close()


# --- scores: everything perplexity needs, so tuning never reruns the model or the search -----------

@dataclass
class Scores:
    """Per predicted position: next token, log p_LM of it, and its k neighbours (distances, tokens)."""

    targets: np.ndarray
    lm_logprobs: np.ndarray
    distances: np.ndarray
    neighbours: np.ndarray

    def knn_logprobs(self, temperature: float, k: int | None = None, chunk: int = 512) -> np.ndarray:
        """log p_kNN of each target with the nearest k (default all) neighbours."""
        out = np.empty(len(self.targets), dtype=np.float32)
        vocab = int(max(self.targets.max(), self.neighbours.max())) + 1
        for s in range(0, len(out), chunk):
            probs = knn_probs(torch.from_numpy(self.distances[s:s + chunk, :k]),
                              torch.from_numpy(self.neighbours[s:s + chunk, :k]), temperature, vocab)
            out[s:s + chunk] = probs.gather(1, torch.from_numpy(self.targets[s:s + chunk, None])).log()[:, 0]
        return out

    def perplexity(self, params: KNNParams) -> float:
        """kNN-LM perplexity under these settings."""
        return self.mixed_perplexity(self.knn_logprobs(params.temp, params.k), params.lam)

    def mixed_perplexity(self, knn_logprobs: np.ndarray, lam: float) -> float:
        """Perplexity of the mixture with these log p_kNN of the targets."""
        mixed = interpolate(torch.from_numpy(self.lm_logprobs), torch.from_numpy(knn_logprobs), lam)
        return math.exp(-mixed.double().mean().item())

    @property
    def base_perplexity(self) -> float:
        return math.exp(-self.lm_logprobs.astype(np.float64).mean())

    def tune(self, k: int, lams: Sequence[float] | None = None,
             temps: Sequence[float] | None = None) -> tuple[KNNParams, float]:
        """(settings, perplexity) minimising perplexity over a grid of λ and temperatures.

        Unless given, temperatures span 1/64..4 times the median distance to the nearest neighbour.
        """
        lams = np.arange(20) / 20 if lams is None else lams
        if temps is None:
            nearest = self.distances[:, 0][np.isfinite(self.distances[:, 0])]
            temps = max(float(np.median(nearest)) if len(nearest) else 1.0, 1e-3) * np.geomspace(1 / 64, 4, 17)
        best = (math.inf, KNNParams.check(k=k))
        for temp in temps:
            knn = self.knn_logprobs(float(temp), k)
            for lam in lams:
                ppl = self.mixed_perplexity(knn, float(lam))
                if ppl < best[0]:
                    best = (ppl, KNNParams.check(lam=float(lam), temp=float(temp), k=k))
        return best[1], best[0]

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("targets", "lm_logprobs", "distances", "neighbours")))


@dataclass
class Perplexity:
    tokens: int
    base_ppl: float
    knnlm_ppl: float
    lam: float
    temp: float
    k: int


def neighbours(memory: MemoryBackend, queries: np.ndarray, k: int,
               batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(distances, token ids) [n, k] of the nearest stored keys, one search call per `batch` queries."""
    found = [memory.search(queries[s:s + batch], k) for s in range(0, len(queries), batch)]
    return (np.concatenate([r.distances for r in found]).astype(np.float32),
            np.concatenate([r.values for r in found]).astype(np.int64))


def neighbours_reading(memory: MemoryBackend, keys: np.ndarray, targets: np.ndarray, k: int,
                       window: int) -> tuple[np.ndarray, np.ndarray]:
    """`neighbours` of one document's keys with a continuous cache: window by window, each window's
    entries join the memory (a temporary partition, deleted afterwards) once it has been searched."""
    cache = f"knnlm-cache-{uuid.uuid4().hex}"
    found = []
    try:
        for s in range(0, len(keys), window):
            found.append(neighbours(memory, keys[s:s + window], k))
            memory.add(keys[s:s + window], values=targets[s:s + window], partition=cache)
    finally:
        memory.delete(partition=cache)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def datastore_spec(name: str, model: PreTrainedModel, index: IndexKind = "flat") -> dict[str, Any]:
    """Arguments of `create_memory` for a kNN-LM datastore of this model."""
    return {"name": name, "dim": model.config.hidden_size, "metric": "l2", "value_kind": "token", "index": index}


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class KNNLM:
    """A model plus a datastore memory (in-process `Memory` or `RemoteMemory`, the same calls)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, memory: MemoryBackend,
                 key: KeyKind | None = None, window: int = 512, batch_size: int = 2, progress: bool = True):
        spec = memory.spec
        if spec.value_kind != "token":
            raise InvalidInput(f"memory '{spec.name}' stores value_kind '{spec.value_kind}'; a kNN-LM datastore "
                               "stores next-token ids (value_kind 'token')", "memory")
        if spec.dim != model.config.hidden_size:
            raise InvalidInput(f"memory '{spec.name}' has dim {spec.dim} but the model's hidden size is "
                               f"{model.config.hidden_size}", "memory")
        built_with = DatastoreState.of(memory).key
        if key is not None and built_with is not None and key != built_with:
            raise InvalidInput(f"memory '{spec.name}' was built with key '{built_with}', not '{key}'", "key")
        self.key = check_key(key or built_with or DEFAULT_KEY)
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.window, self.batch_size, self.progress = window, batch_size, progress

    def params(self, lam: float | None = None, temp: float | None = None, k: int | None = None) -> KNNParams:
        """The given settings, falling back to the tuned ones stored with the memory, then to defaults."""
        state = DatastoreState.of(self.memory)
        stored = KNNParams.check(lam=state.lam, temp=state.temp, k=state.k)
        return KNNParams.check(lam=stored.lam if lam is None else lam, temp=stored.temp if temp is None else temp,
                               k=stored.k if k is None else k)

    def _entries(self) -> int:
        """Entries in the unpartitioned datastore (continuous-cache partitions excluded)."""
        return next((p.count for p in self.memory.stats().partitions if p.name is None), 0)

    # --- build -----------------------------------------------------------------------------------

    def build(self, texts: Sequence[str], add_batch: int = 8192) -> int:
        """Add a (key, next token) entry per predicted position of the texts; returns entries added.

        Documents already in the datastore are skipped; a document a crash left half-added is finished.
        """
        docs = tokenize_documents(self.tokenizer, texts)
        state = DatastoreState.of(self.memory)
        done = set(state.sources)
        partial = self._entries() - state.entries
        todo = {text_id(t): ids for t, ids in zip(texts, docs) if text_id(t) not in done}
        current = state.building
        if partial < 0:
            raise InvalidInput(f"memory '{self.memory.spec.name}' has fewer entries than its recorded build; "
                               "entries were deleted behind the build's back, rebuild it in a new memory", "memory")
        if partial and current not in todo:
            raise InvalidInput(f"memory '{self.memory.spec.name}' holds {partial} entries of an unfinished build "
                               "of a document not among these texts; rerun the build with the same files", "texts")
        order = sorted(todo, key=lambda h: h != current)  # an unfinished document first
        nexts = [*order[1:], None]
        state = state.model_copy(update={"key": self.key, "window": self.window, "building": order[0] if order else None})
        state.save(self.memory)
        added = 0
        for h, following, enc in zip(order, nexts, encode(self.model, [todo[h] for h in order], (self.key,),
                                                          self.window, self.batch_size, self.progress, logprobs=False)):
            keys, targets = enc.keys[self.key][partial:], enc.targets[partial:]
            for s in range(0, len(keys), add_batch):
                self.memory.add(keys[s:s + add_batch], values=targets[s:s + add_batch])
            added += len(keys)
            partial = 0
            # one write per document: it is in, and the next one is being added
            state = state.model_copy(update={"sources": [*state.sources, h], "entries": state.entries + len(enc.targets),
                                             "building": following})
            state.save(self.memory)
        return added

    # --- evaluation ------------------------------------------------------------------------------

    def score(self, texts: Sequence[str], k: int | None = None, continuous: bool = False) -> Scores:
        """Scores of the texts against the datastore; with `continuous`, each document's own earlier
        windows join the datastore while it is read (a temporary partition, deleted afterwards)."""
        k = self.params(k=k).k
        docs = tokenize_documents(self.tokenizer, texts)
        if not self.memory.stats().count:
            raise InvalidInput(f"memory '{self.memory.spec.name}' is empty; build the datastore first", "memory")
        parts = []
        for enc in encode(self.model, docs, (self.key,), self.window, self.batch_size, self.progress):
            keys = enc.keys[self.key]
            found = (neighbours_reading(self.memory, keys, enc.targets, k, self.window) if continuous
                     else neighbours(self.memory, keys, k))
            parts.append(Scores(enc.targets, enc.lm_logprobs, *found))
        return Scores.concat(parts)

    def perplexity(self, texts: Sequence[str], lam: float | None = None, temp: float | None = None,
                   k: int | None = None, continuous: bool = False) -> Perplexity:
        """Base and kNN-LM perplexity of the texts (settings default to the tuned ones)."""
        params = self.params(lam, temp, k)
        scores = self.score(texts, params.k, continuous)
        return Perplexity(tokens=len(scores.targets), base_ppl=scores.base_perplexity,
                          knnlm_ppl=scores.perplexity(params), lam=params.lam, temp=params.temp, k=params.k)

    def tune(self, texts: Sequence[str], k: int | None = None, lams: Sequence[float] | None = None,
             temps: Sequence[float] | None = None, continuous: bool = False) -> tuple[KNNParams, float]:
        """Pick λ and temperature minimising perplexity on validation texts (`Scores.tune`) and store
        them with the memory."""
        k = self.params(k=k).k
        scores = self.score(texts, k, continuous)
        tuned, ppl = scores.tune(k, lams, temps)
        DatastoreState.of(self.memory).model_copy(update={
            **tuned.model_dump(), "tuned_on_tokens": len(scores.targets), "tuned_base_ppl": scores.base_perplexity,
            "tuned_knnlm_ppl": ppl, "tuned_continuous": continuous}).save(self.memory)
        return tuned, ppl

    # --- generation --------------------------------------------------------------------------------

    def mix(self, logprobs: torch.Tensor, keys: torch.Tensor, params: KNNParams) -> torch.Tensor:
        """log(λ·p_kNN + (1−λ)·p_LM) [batch, vocab] from log p_LM [batch, vocab] and the step's keys [batch,
        hidden] (one search of the datastore)."""
        found = self.memory.search(keys.float().cpu().numpy(), params.k)
        probs = knn_probs(torch.from_numpy(found.distances), torch.from_numpy(found.values.astype(np.int64)),
                          params.temp, logprobs.shape[-1])
        return interpolate(logprobs, probs.log().to(logprobs.device), params.lam)

    @contextmanager
    def hook(self, params: KNNParams) -> Iterator[LogprobsHook]:
        """A decoding-loop hook that mixes p_kNN into each step's log-probabilities (one search per step);
        the key is captured from the same forward pass while the block is open."""
        with capture_keys(self.model, (self.key,)) as captured:
            yield lambda logprobs, outputs: self.mix(logprobs, captured[self.key][:, -1], params)

    def logits_processor(self, lam: float | None = None, temp: float | None = None,
                         k: int | None = None) -> KNNLogitsProcessor:
        """kNN-LM for `model.generate(..., logits_processor=[...])` (settings default to the tuned ones);
        see `KNNLogitsProcessor`."""
        return KNNLogitsProcessor(self, self.params(lam, temp, k))

    def generate(self, prompt: str, lam: float | None = None, temp: float | None = None, k: int | None = None,
                 **options: Any) -> Iterator[str]:
        """Stream a continuation decoded from the kNN-LM mixture; `options` go to `lm.generate.generate`."""
        with self.hook(self.params(lam, temp, k)) as mix:
            yield from generate(self.model, self.tokenizer, prompt, logprobs_hook=mix, **options)


class KNNLogitsProcessor(LogitsProcessor):
    """kNN-LM as a transformers `LogitsProcessor`: `model.generate(ids, logits_processor=[processor])` decodes
    from log(λ·p_kNN + (1−λ)·p_LM), as `KNNLM.generate` does (the same tokens, greedy).

    Made by `KNNLM.logits_processor`. It registers forward hooks on the model that capture each forward's key
    (the datastore's hidden state), and at each step searches the datastore (a local `Memory` or a served
    `RemoteMemory`) with the last position's key. The hooks stay until `close()` (or the end of a `with`
    block, or the processor being garbage collected). Put it first among custom processors: it reads the
    scores as the model's logits, and generate applies its own warpers (temperature, top-k, top-p) after it.
    """

    def __init__(self, knnlm: KNNLM, params: KNNParams):
        self.knnlm, self.params = knnlm, params
        self.captured, handles = key_hooks(knnlm.model, (knnlm.key,))
        self.close = weakref.finalize(self, _remove, handles)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Mixed log-probabilities [batch, vocab] for the step's logits `scores` [batch, vocab]."""
        if self.knnlm.key not in self.captured:
            raise InvalidInput("the kNN-LM logits processor saw no forward of its model (closed, or another model)",
                               "logits_processor")
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        return self.knnlm.mix(logprobs, self.captured.pop(self.knnlm.key)[:, -1], self.params)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
