"""lm/rag.py: the prompt numbers the retrieved passages, citations follow them, and ask decodes through
`lm.generate` over an in-process collection (a tiny random Llama, the tiny encoder of test_collections).
SmolLM2 answering from real docs is test_collections' slow CLI test, through a running server."""
from __future__ import annotations

import pytest
from test_collections import docs

from lm.generate import generate
from lm.model import tiny_llama
from lm.rag import SYSTEM, ask, build_prompt, citations
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

