"""lm/rag.py: the prompt numbers the retrieved passages, citations follow them, and ask decodes through
`lm.generate` over an in-process collection (a tiny random Llama, the tiny encoder of test_collections).
SmolLM2 answering from real docs is test_collections' slow CLI test, through a running server."""
from __future__ import annotations

import pytest
from conftest import talking_llama
from test_collections import docs

from lm.generate import generate
from lm.model import tiny_llama
from lm.rag import SYSTEM, ask, ask_stream, build_prompt, citations, trimmed
from memsvc.config import Settings
from memsvc.contract import DocumentHit, InvalidInput
from memsvc.service import Service


def hit(n: int, section: str = "") -> DocumentHit:
    return DocumentHit(f"doc{n}.md", f"doc{n}.md#0-abc", 1.0 / n, f"text of passage {n}", section, {})


@pytest.fixture
def collection(tmp_path, tiny_encoder):
    with Service(Settings(data_dir=tmp_path / "data"), encoder=lambda: tiny_encoder) as service:
        col = service.create_collection("docs")
        col.upsert(docs())
        yield col


def test_prompt_numbers_passages_in_order():
    prompt = build_prompt("What is it?", [hit(1, "Intro"), hit(2)])
    assert prompt.index("[1] doc1.md (Intro):\ntext of passage 1") < prompt.index("[2] doc2.md:\ntext of passage 2")
    assert prompt.endswith("Question: What is it?")
    assert "(none found)" in build_prompt("What is it?", [])


def test_citations_mark_what_the_answer_cites():
    cited = citations("It is X [2], see also [2] and [7].", [hit(1), hit(2), hit(3)])
    assert [(c.n, c.chunk_id, c.cited) for c in cited] == [
        (1, "doc1.md#0-abc", False), (2, "doc2.md#0-abc", True), (3, "doc3.md#0-abc", False)]
    assert [(c.text, c.section) for c in citations("[1]", [hit(1, "Intro")])] == [("text of passage 1", "Intro")]


def test_ask_decodes_the_prompt_through_the_generation_loop(collection):
    model, tokenizer = tiny_llama()
    question = "What is a generator?"
    answer = ask(collection, model, tokenizer, question, k=2, max_new_tokens=6)
    passages = collection.search(question, 2)
    assert [(c.chunk_id, c.text, c.section) for c in answer.citations] == [(p.chunk_id, p.text, p.section)
                                                                           for p in passages]  # what it read
    expected = "".join(generate(model, tokenizer, build_prompt(question, passages), chat=True, system=SYSTEM,
                                max_new_tokens=6)).strip()
    assert answer.answer == expected


def test_ask_bad_input(collection):
    model, tokenizer = tiny_llama()
    for question, k, field in (("", 2, "question"), ("  ", 2, "question"), ("x", 0, "k"), ("x", -1, "k")):
        with pytest.raises(InvalidInput) as info:
            ask(collection, model, tokenizer, question, k=k)
        assert info.value.field == field



def test_trimmed_pieces_join_to_the_stripped_text():
    pieces = ["\n", " a", "b ", "\n", "c", " ", "\n"]
    assert list(trimmed(iter(pieces))) == ["a", "b", " \nc"]  # whitespace waits for the text after it
    assert "".join(trimmed(iter(pieces))) == "".join(pieces).strip()
    assert list(trimmed(iter([" ", "\n"]))) == []


def test_ask_stream_gives_the_answer_piece_by_piece(collection):
    model, tokenizer = talking_llama()
    question = "What is a generator?"
    passages = collection.search(question, 2)
    raw = list(generate(model, tokenizer, build_prompt(question, passages), chat=True, system=SYSTEM,
                        max_new_tokens=8))
    assert raw[:3] == [" Rog", " bowls", " bb"]  # the talking model's greedy answer (seed 2)
    stream = ask_stream(collection, model, tokenizer, question, k=2, max_new_tokens=8)
    pieces = list(stream)
    assert pieces == ["Rog", *raw[1:]]  # one piece per token, the answer's leading space dropped
    answer = stream.result()
    assert answer.answer == "".join(pieces) == ask(collection, model, tokenizer, question, k=2, max_new_tokens=8).answer
    assert [c.chunk_id for c in answer.citations] == [p.chunk_id for p in passages]


def test_ask_stream_checks_its_input_before_decoding(collection):
    model, tokenizer = talking_llama()
    for question, k, field in (("", 2, "question"), ("x", 0, "k")):
        with pytest.raises(InvalidInput) as info:
            ask_stream(collection, model, tokenizer, question, k=k)
        assert info.value.field == field
    with ask_stream(collection, model, tokenizer, "What is a generator?", k=2, max_new_tokens=50) as stream:
        first = next(iter(stream))
    assert first == "Rog"
    with pytest.raises(RuntimeError, match="closed before its end"):
        stream.result()
