"""Retrieval-augmented generation: x' = g(c1..ck, x). Retrieve k passages for the question, number
them in a chat prompt, and decode the answer with the one generation loop (`lm.generate`). `ask_stream` gives
the answer's text pieces as they decode (what the REST route sends as server-sent events); `ask` joins them.

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
from memsvc.contract import Answer, AnswerStream, Citation, DocumentHit, InvalidInput, check_unicode
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


def trimmed(pieces: Iterator[str]) -> Iterator[str]:
    """`pieces` without the whitespace at the start and end of their concatenation: joined, they are
    `"".join(pieces).strip()`. Whitespace is held back until text follows it, so a piece comes out as soon as
    it holds anything else."""
    held = ""
    started = False
    for piece in pieces:
        text = held + piece
        if not started:
            text = text.lstrip()
            started = bool(text)
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


def ask_stream(searcher: Searcher, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
               k: int = 4, max_new_tokens: int = 256) -> AnswerStream:
    """Retrieve k passages (the searcher's default mode) now, then stream the answer decoded from them
    (greedy) as text pieces, and its `Answer` with citations at the end. InvalidInput (question, k) and the
    searcher's errors are raised here, before anything decodes."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput("question must be a non-empty string", "question")
    check_unicode(question, "question")
    passages = searcher.search(question, check_k(k))

    def events() -> Iterator[str | Answer]:
        pieces = []
        for piece in trimmed(stream_answer(model, tokenizer, question, passages, max_new_tokens)):
            pieces.append(piece)
            yield piece
        answer = "".join(pieces)
        yield Answer(answer, citations(answer, passages))

    return AnswerStream(events())


def ask(searcher: Searcher, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
        k: int = 4, max_new_tokens: int = 256) -> Answer:
    """Retrieve k passages (the searcher's default mode), answer from them, cite them (`ask_stream`, joined)."""
    return ask_stream(searcher, model, tokenizer, question, k, max_new_tokens).result()
