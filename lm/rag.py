"""Retrieval-augmented generation: x' = g(c1..ck, x). Retrieve k passages for the question, number
them in a chat prompt, and decode the answer with the one generation loop (`lm.generate`).

The retriever is anything with `search(query, k) -> [DocumentHit]`: an in-process
`memsvc.collections.Collection` or a `memsvc.client.RemoteCollection`. Citations list every passage the
model was given, with its text and section, each marked `cited` when the answer refers to it as [n].
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lm.generate import generate
from memsvc.contract import Answer, Citation, DocumentHit, InvalidInput
from retrievers.base import check_k

SYSTEM = ("You answer questions using only the numbered passages given with the question. Cite the passages "
          "you use like [1]. If the passages do not contain the answer, say that you do not know.")
CITATION = re.compile(r"\[(\d+)\]")


class Searcher(Protocol):
    def search(self, query: str, k: int = 10) -> list[DocumentHit]: ...


def build_prompt(question: str, passages: Sequence[DocumentHit]) -> str:
    """The user turn: numbered passages (with their document and section), then the question."""
    numbered = "\n\n".join(f"[{n}] {p.document_id}{f' ({p.section})' if p.section else ''}:\n{p.text}"
                           for n, p in enumerate(passages, start=1))
    return f"Passages:\n\n{numbered or '(none found)'}\n\nQuestion: {question}"


def stream_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
                  passages: Sequence[DocumentHit], max_new_tokens: int = 256) -> Iterator[str]:
    """The answer's text pieces as they decode (greedy)."""
    return generate(model, tokenizer, build_prompt(question, passages), chat=True, system=SYSTEM,
                    max_new_tokens=max_new_tokens)


def citations(answer: str, passages: Sequence[DocumentHit]) -> list[Citation]:
    cited = {int(n) for n in CITATION.findall(answer)}
    return [Citation(n, p.document_id, p.chunk_id, p.score, n in cited, p.text, p.section)
            for n, p in enumerate(passages, start=1)]


def ask(searcher: Searcher, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
        k: int = 4, max_new_tokens: int = 256) -> Answer:
    """Retrieve k passages (the searcher's default mode), answer from them, cite them."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput("question must be a non-empty string", "question")
    passages = searcher.search(question, check_k(k))
    answer = "".join(stream_answer(model, tokenizer, question, passages, max_new_tokens)).strip()
    return Answer(answer, citations(answer, passages))
