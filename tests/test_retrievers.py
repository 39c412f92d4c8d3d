"""Retrievers: chunking, BM25, dense, fusion, hybrid. Unit tests use the MiniLM tokenizer (no weights)
and a tiny random sentence encoder; the slow test loads all-MiniLM-L6-v2 and reads the real docs."""
from __future__ import annotations

import math
import random
import zlib
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi
from transformers import AutoTokenizer

from memsvc.contract import InvalidInput
from memsvc.store import Memory
from retrievers.base import Chunk, Hit, group_by_document
from retrievers.bm25 import BM25Retriever, tokenize
from retrievers.chunking import Chunker, CountingTokenizer, decode, detect_format
from retrievers.dense import DenseIndex, DenseRetriever, SentenceEncoder, embedding_key, model_path
from retrievers.hybrid import DEFAULT_FUSION, RRF, HybridRetriever, ScoreFusion

DOCS = Path("/usr/share/doc/python3.11/html/_sources")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path())


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def chunk(doc: str, n: int, text: str) -> Chunk:
    return Chunk(f"{doc}#{n}-{zlib.crc32(text.encode()):08x}", doc, text)


# --- chunking -----------------------------------------------------------------------------------

RST = """\
=========
Top title
=========

Intro paragraph of the page.

First section
-------------

Text of the first section.

Sub section
^^^^^^^^^^^

Text of the sub section.

Second section
--------------

Text of the second section.
"""


def test_rst_headings_start_chunks_and_build_a_trail(tokenizer):
    chunks = Chunker(tokenizer).chunk("page.rst", RST)
    assert [c.text.splitlines()[0] for c in chunks] == ["Top title", "First section", "Sub section", "Second section"]
    assert [c.section for c in chunks] == ["Top title", "Top title > First section",
                                          "Top title > First section > Sub section", "Top title > Second section"]
    assert not any("---" in c.text or "===" in c.text for c in chunks)
    assert "Text of the sub section." in chunks[2].text and "first section." not in chunks[2].text


def test_markdown_headings_ignore_code_fences_and_carry_empty_headings(tokenizer):
    md = "# Guide\n\n## Install\n\nRun pip.\n\n```sh\n# not a heading\npip install x\n```\n\n## Use\n\nCall it.\n"
    chunks = Chunker(tokenizer).chunk("guide.md", md)
    assert [c.section for c in chunks] == ["Guide > Install", "Guide > Use"]
    assert chunks[0].text.startswith("# Guide\n## Install")  # the empty "Guide" heading leads its child
    assert "# not a heading\npip install x" in chunks[0].text


def test_the_title_starts_every_trail_even_when_its_adornment_comes_back(tokenizer):
    """c-api/float.rst.txt reuses its title's adornment further down: those headings used to lose the
    title from their trail (31% of the Python docs' sections, bench/results/retrieval_v2.md)."""
    rst = ("Floating Point Objects\n----------------------\n\nIntro.\n\nPack and Unpack\n===============\n\n"
           "Both ways.\n\nPack functions\n--------------\n\nPack text.\n")
    assert [c.section for c in Chunker(tokenizer).chunk("float.rst", rst)] == [
        "Floating Point Objects", "Floating Point Objects > Pack and Unpack", "Floating Point Objects > Pack functions"]


MD_GUIDE = "# Guide\n\n## Install\n\nRun pip install memsvc.\n\n### On Windows\n\nUse py -m pip.\n"


def test_contextual_chunk_text_prefixes_the_title_or_the_trail(tokenizer):
    plain = Chunker(tokenizer).chunk("guide.md", MD_GUIDE)
    assert [c.section for c in plain] == ["Guide > Install", "Guide > Install > On Windows"]
    assert [Chunker(tokenizer).contextual(c) for c in plain] == [c.text for c in plain]
    trail, title = Chunker(tokenizer, context="trail"), Chunker(tokenizer, context="title")
    assert [c.id for c in trail.chunk("guide.md", MD_GUIDE)] == [c.id for c in plain]  # ids hash the plain text
    assert [trail.contextual(c) for c in plain] == [
        "Guide > Install\n# Guide\n## Install\n\nRun pip install memsvc.",
        "Guide > Install > On Windows\n### On Windows\n\nUse py -m pip."]
    assert title.contextual(plain[1]) == "Guide\n### On Windows\n\nUse py -m pip."
    assert trail.budget == Chunker(tokenizer).budget - 32  # room for the prefix in the embedder's window
    short = Chunker(tokenizer, context="trail", context_tokens=4)  # middle headings go first, then tokens
    assert short.contextual(plain[1]) == "Guide > On Windows\n### On Windows\n\nUse py -m pip."
    long_title = Chunk("d#0-x", "d", "body", "A very long document title indeed")
    assert Chunker(tokenizer, context="title", context_tokens=3).contextual(long_title) == "A very long\nbody"
    assert trail.contextual(Chunk("d#0-x", "d", "no heading")) == "no heading"
    with pytest.raises(InvalidInput) as err:
        Chunker(tokenizer, context="heading")
    assert err.value.field == "context"


def test_format_detection():
    assert detect_format("a.md", "") == "markdown"
    assert detect_format("a.rst.txt", "") == "rst"
    assert detect_format("notes", "Title\n=====\n\ntext") == "rst"
    assert detect_format("notes", "## Title\n\ntext") == "markdown"
    assert detect_format("notes", "just text\n\nmore text") == "text"


def test_long_paragraph_is_cut_with_overlap_and_within_the_token_limit(tokenizer):
    lines = [f"Line {i} of the long paragraph talks about topic {i}." for i in range(60)]
    chunker = Chunker(tokenizer, size=64, overlap=16)
    chunks = chunker.chunk("long.txt", "\n".join(lines))
    assert len(chunks) > 3
    for a, b in pairwise(chunks):
        assert b.text.splitlines()[0] in a.text.splitlines()[-2:]  # the cut repeats the tail of a
    assert all(tokens(tokenizer, c.text) <= 64 for c in chunks)
    assert {line for c in chunks for line in c.text.splitlines()} == set(lines)


def test_paragraph_boundaries_need_no_overlap_and_reST_directives_start_chunks(tokenizer):
    blocks = [f".. function:: f{i}(x)\n\n   Returns the {i}th transformation of *x*, computed lazily and cached."
              for i in range(12)]
    chunks = Chunker(tokenizer, size=64, overlap=16).chunk("api.rst", "\n\n".join(blocks))
    assert len(chunks) > 2
    assert all(c.text.startswith(".. function::") for c in chunks)
    assert sum(c.text.count(".. function::") for c in chunks) == 12  # nothing repeated


def test_overlong_lines_and_words_are_cut_to_the_limit(tokenizer):
    prose = " ".join(f"word{i}" for i in range(1500))  # one line, no sentence ends
    blob = "x" * 5000  # one "word" of many tokens
    chunks = Chunker(tokenizer, size=128, overlap=0).chunk("big.txt", prose + "\n\n" + blob)
    assert all(tokens(tokenizer, c.text) <= 128 for c in chunks)
    words = " ".join(c.text for c in chunks).split()
    assert [w for w in words if w.startswith("word")] == prose.split()
    assert "".join(w for w in words if w.startswith("x")) == blob


def test_chunk_ids_are_stable_and_change_only_with_their_text(tokenizer):
    chunker = Chunker(tokenizer)
    first = chunker.chunk("page.rst", RST)
    assert [c.id for c in first] == [c.id for c in chunker.chunk("page.rst", RST)]
    assert all(c.id.startswith("page.rst#") for c in first)
    edited = chunker.chunk("page.rst", RST.replace("Text of the second section.", "Changed text."))
    assert [c.id for c in edited[:3]] == [c.id for c in first[:3]]
    assert edited[3].id != first[3].id and edited[3].id.startswith("page.rst#3-")


@pytest.mark.parametrize("text", ["", "  \n\n \t"])
def test_empty_document_is_rejected(tokenizer, text):
    with pytest.raises(InvalidInput) as err:
        Chunker(tokenizer).chunk("empty.txt", text)
    assert err.value.field == "text"


def test_non_utf8_bytes_are_rejected_and_utf8_bytes_accepted(tokenizer):
    with pytest.raises(InvalidInput) as err:
        Chunker(tokenizer).chunk("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    assert err.value.field == "text" and "UTF-8" in err.value.message
    assert decode("café".encode()) == "café"
    assert Chunker(tokenizer).chunk("u.txt", "\ufeffcafé".encode())[0].text == "café"


@pytest.mark.parametrize("doc_id", ["", "a\nb", 5])
def test_bad_document_id_is_rejected(tokenizer, doc_id):
    with pytest.raises(InvalidInput) as err:
        Chunker(tokenizer).chunk(doc_id, "text")
    assert err.value.field == "document_id"


def long_word(i: int) -> str:
    """A 99-letter word (the tokenizer's limit is 100) of 33 or more tokens: cuts fall inside it."""
    return "".join("bcdfghjklmnpqrstvwxz"[(i * 7 + j * j) % 20] + "aeiou"[j % 5] for j in range(49)) + "x"


MIXED = "\n\n".join([" ".join(f"word{i}" for i in range(3000)),
                      "\n".join(f"Short line {i}." for i in range(2000)),
                      " ".join(f"Sentence number {i} ends here." for i in range(1500)),
                      "".join(chr(0x4E00 + i % 2000) for i in range(3000))])
# name: (text, chunk size, tokenizer calls, most characters tokenized per character of text)
LONG_INPUTS = {
    "one line of 20,000 words, no sentence end": (" ".join(f"word{i % 97}" for i in range(20_000)), 128, 1, 1),
    "one line without spaces": ("/".join(f"seg{i % 89}" for i in range(20_000)), 128, 1, 1),
    "one line of 20,000 CJK characters": ("".join(chr(0x4E00 + i % 2000) for i in range(20_000)), 128, 2, 2),
    "one line of 5,000 words, under 64K characters": (" ".join(f"word{i % 97}" for i in range(5_000)), 128, 2, 2),
    "one line of words longer than a chunk": (" ".join(long_word(i) for i in range(300)), 20, 3, 3),
    "20,000 short lines": ("\n".join(f"line {i} of many" for i in range(20_000)), 128, 5, 1),
    "mixed paragraphs": (MIXED, 128, 4, 2),
}


@pytest.mark.parametrize("name", list(LONG_INPUTS))
def test_chunking_work_is_linear_in_the_length_of_the_text(tokenizer, name):
    """Issue 12: chunking one long line re-tokenized the rest of the line for every piece it cut
    (20,000 words: 83.5 s). Now a line is tokenized once to count it and once to cut it (once in all past
    64K characters), pieces cut inside a word once more; the chunks still fit and lose nothing."""
    text, size, calls, per_char = LONG_INPUTS[name]
    counting = CountingTokenizer(tokenizer)
    chunks = Chunker(counting, size=size, overlap=0).chunk("long.txt", text)
    assert counting.calls == calls
    assert counting.chars <= per_char * len(text)
    assert max(len(ids) for ids in tokenizer([c.text for c in chunks])["input_ids"]) <= size
    assert "".join("".join(c.text.split()) for c in chunks) == "".join(text.split())


def test_cutting_a_line_gives_what_cutting_piece_by_piece_gave(tokenizer):
    """The pieces of a long line, cut at the whole line's token offsets, are those of the chunker that
    re-tokenized each remainder (expected values from it): sentences halved until they fit, then a
    sentence too long alone cut between words."""
    line = "Short one. Another short sentence here! " + " ".join(f"w{i}" for i in range(30)) + \
        "; tail sentence ends? Last one."
    assert [c.text for c in Chunker(tokenizer, size=16, overlap=0).chunk("s.txt", line)] == [
        "Short one. Another short sentence here!", "w0 w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11 w12 w13",
        "w14 w15 w16 w17 w18 w19 w20", "w21 w22 w23 w24 w25 w26 w27", "w28 w29; tail sentence ends? Last one."]
    words = " ".join(f"w{i}" for i in range(100))
    assert [c.text for c in Chunker(tokenizer, size=40, overlap=0).chunk("w.txt", words)][:2] == [
        " ".join(f"w{i}" for i in range(19)), " ".join(f"w{i}" for i in range(19, 38))]


@pytest.mark.timeout(60)
def test_markdown_headings_are_read_in_linear_time_and_lose_only_a_closing_sequence(tokenizer):
    """A heading line with a long run of spaces took the old heading pattern cubic time (10,000 spaces:
    more than 5 minutes); the closing '#' sequence is dropped only after a space (CommonMark)."""
    chunker = Chunker(tokenizer)
    text = "# a" + " " * 200_000 + "b\n\nbody\n\n## Setup ##\n\nx\n\n## C#\n\ny\n\n#  spaced  #   \n\nz"
    assert [c.section for c in chunker.chunk("h.md", text)] == [
        "a" + " " * 200_000 + "b", "a" + " " * 200_000 + "b > Setup", "a" + " " * 200_000 + "b > C#",
        "a" + " " * 200_000 + "b > spaced"]  # a later top-level heading stays under the title


# --- BM25 ---------------------------------------------------------------------------------------

def test_tokenizer_splits_identifiers_and_drops_stopwords():
    assert tokenize("What is os.path.join?") == ["os.path.join", "os", "path", "join"]
    assert tokenize("snake_case HTTPServer") == ["snake_case", "snake", "case", "httpserver", "http", "server"]
    assert tokenize("__init__ utf8 float32") == ["__init__", "init", "utf8", "float32"]
    assert tokenize("Importing the classes") == ["import", "class"]


def test_bm25_ranks_the_exact_term_document_first():
    bm25 = BM25Retriever()
    bm25.add([chunk("paths", 0, "Use os.path.join to join path components."),
              chunk("files", 0, "Open a file and read the path of it; paths and more paths."),
              chunk("json", 0, "json.loads parses a JSON document."),
              chunk("misc", 0, "Nothing relevant here.")])
    assert bm25.search("os.path.join", 3)[0].document_id == "paths"
    assert bm25.search("json.loads", 3)[0].document_id == "json"
    assert bm25.search("unrelated words", 3) == []
    assert len(bm25.search("path", 1)) == 1


def test_bm25_finds_a_term_in_half_of_a_tiny_corpus():
    bm25 = BM25Retriever()  # Okapi's idf is 0 here (rank-bm25 finds nothing); Lucene's idf is not
    bm25.add([chunk("a", 0, "alpha beta"), chunk("b", 0, "gamma delta")])
    assert [h.document_id for h in bm25.search("alpha", 5)] == ["a"]


def test_bm25_scores_match_rank_bm25_with_lucene_idf():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(3, 30))) for _ in range(50)]
    bm25 = BM25Retriever()
    bm25.add([chunk(f"d{i}", 0, t) for i, t in enumerate(texts)])
    reference = BM25Okapi([tokenize(t) for t in texts])
    n = len(texts)
    reference.idf = {w: math.log1p((n - df + 0.5) / (df + 0.5))
                     for w, df in ((w, sum(w in f for f in reference.doc_freqs)) for w in vocab)}
    for query in ("w1 w2", "w3 w3 w17", "w39"):
        expected = reference.get_scores(tokenize(query))
        hits = bm25.search(query, n)
        assert len(hits) == np.count_nonzero(expected)
        for hit in hits:
            assert hit.score == pytest.approx(expected[int(hit.document_id[1:])])


def test_bm25_upsert_skips_unchanged_and_replaces_changed_chunks():
    bm25 = BM25Retriever()
    v1 = [chunk("doc", 0, "apples are red"), chunk("doc", 1, "bananas are yellow")]
    assert bm25.add(v1) == 2
    assert bm25.add(v1) == 0
    v2 = [v1[0], chunk("doc", 1, "cherries are dark")]
    assert bm25.add(v2) == 1 and len(bm25) == 2
    assert bm25.search("bananas", 5) == []
    assert [h.chunk_id for h in bm25.search("cherries", 5)] == [v2[1].id]
    assert bm25.remove("doc") == 2 and bm25.remove("doc") == 0
    assert bm25.search("apples", 5) == [] and len(bm25) == 0


# --- fusion -------------------------------------------------------------------------------------

def hits(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(chunk_id, chunk_id, score) for chunk_id, score in pairs]


BM25_LIST = hits(("a", 10.0), ("b", 5.0), ("c", 0.0))
DENSE_LIST = hits(("b", 0.9), ("c", 0.5), ("d", 0.1))


def test_rrf_sums_reciprocal_ranks():
    fused = RRF()([BM25_LIST, DENSE_LIST], 10)
    expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 62, "d": 1 / 63}
    assert [h.chunk_id for h in fused] == ["b", "c", "a", "d"]
    assert {h.chunk_id: h.score for h in fused} == pytest.approx(expected)
    weighted = RRF(weights=(1.0, 3.0), c=0)([BM25_LIST, DENSE_LIST], 2)
    assert [(h.chunk_id, h.score) for h in weighted] == [("b", pytest.approx(1 / 2 + 3)),
                                                        ("c", pytest.approx(1 / 3 + 3 / 2))]


def test_minmax_fusion_normalises_and_weights():
    fused = ScoreFusion((0.2, 0.8), "minmax")([BM25_LIST, DENSE_LIST], 10)
    # bm25 -> a 1, b 0.5, c 0; dense -> b 1, c 0.5, d 0; a missing chunk gets the list's minimum (0)
    assert {h.chunk_id: h.score for h in fused} == pytest.approx({"a": 0.2, "b": 0.9, "c": 0.4, "d": 0.0})
    assert [h.chunk_id for h in fused] == ["b", "c", "a", "d"]


def test_raw_score_mix():
    fused = ScoreFusion((0.1, 1.0), "none")([BM25_LIST, DENSE_LIST], 10)
    # bm25 -> a 1, b 0.5, c 0; dense -> b 0.9, c 0.5, d 0.1; missing a, d get 0.1 and 0
    assert {h.chunk_id: h.score for h in fused} == pytest.approx({"a": 1.1, "b": 1.4, "c": 0.5, "d": 0.1})


def test_zscore_fusion_gives_missing_chunks_the_lowest_z():
    fused = ScoreFusion((1.0, 1.0), "zscore")([hits(("a", 3.0), ("b", 1.0)), hits(("b", 2.0), ("c", 0.0))], 10)
    # each list is (+1, -1) in z; a and c are missing from one list each and get its -1
    assert {h.chunk_id: h.score for h in fused} == pytest.approx({"a": 0.0, "b": 0.0, "c": -2.0})
    assert [h.chunk_id for h in fused] == ["a", "b", "c"]  # ties keep first appearance


@pytest.mark.parametrize("make", [lambda: RRF(weights=(-1.0, 1.0)), lambda: ScoreFusion((0.0, 0.0)),
                                  lambda: ScoreFusion(norm="rank")])
def test_bad_fusion_parameters_are_rejected(make):
    with pytest.raises(InvalidInput):
        make()


def test_fusion_needs_one_weight_per_ranking():
    with pytest.raises(InvalidInput) as err:
        RRF(weights=(1.0, 1.0, 1.0))([BM25_LIST, DENSE_LIST], 3)
    assert err.value.field == "weights"


# --- dense and hybrid ---------------------------------------------------------------------------

def dense_index(encoder, path: Path | None = None) -> DenseIndex:
    spec = DenseIndex.spec("chunks", encoder)
    return DenseIndex(Memory.create(spec, path) if path else Memory(spec), encoder)


def add_to(index: DenseIndex, bm25: BM25Retriever, chunks: list[Chunk]) -> int:
    """Add chunks to both indexes (dense first, as a collection does); how many were embedded."""
    embedded = index.add(chunks)
    bm25.add(chunks)
    return embedded


def test_dense_upsert_and_remove_keep_the_memory_in_step(tiny_encoder):
    index = dense_index(tiny_encoder)
    dense = DenseRetriever(index)
    v1 = [chunk("a", 0, "alpha text"), chunk("a", 1, "more alpha"), chunk("b", 0, "bravo text")]
    assert index.add(v1) == 3 and len(index.memory) == 3
    assert dense.search("more alpha", 1)[0].chunk_id == v1[1].id  # identical text, cosine 1
    assert dense.search("more alpha", 1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert index.add(v1) == 0 and len(index.memory) == 3
    v2 = [v1[0], chunk("a", 1, "changed alpha")]
    assert index.add(v2) == 1 and len(index.memory) == 3
    assert set(index.vector_ids["a"]) == {v2[0].id, v2[1].id}
    assert v1[1].id not in {h.chunk_id for h in dense.search("more alpha", 10)}
    assert index.remove("a") == 2 and len(index.memory) == 1
    assert [h.document_id for h in dense.search("alpha", 10)] == ["b"]


def test_dense_reopens_over_a_durable_memory(tiny_encoder, tmp_path):
    index = dense_index(tiny_encoder, tmp_path / "mem")
    index.add([chunk("a", 0, "alpha"), chunk("b", 0, "bravo")])
    index.memory.close()
    reopened = DenseIndex(Memory.open(tmp_path / "mem"), tiny_encoder, index.vector_ids)
    assert DenseRetriever(reopened).search("bravo", 1)[0].document_id == "b"
    assert reopened.remove("b") == 1
    assert [h.document_id for h in DenseRetriever(reopened).search("bravo", 5)] == ["a"]


def test_dense_vectors_stored_unpublished_are_not_scored_by_id(tiny_encoder):
    """`store` writes vectors (a collection's uncommitted version); scoring by chunk id sees them once
    `publish` names them, and a published replacement is what `score` reads."""
    index = dense_index(tiny_encoder)
    dense = DenseRetriever(index)
    first = chunk("a", 0, "alpha text")
    ids = index.store([first], partition="v1")
    assert len(index.memory) == 1 and dense.score("alpha text", [first.id]) == []
    index.publish({"a": dict(zip([first.id], ids))})
    assert dense.score("alpha text", [first.id])[0].score == pytest.approx(1.0, abs=1e-5)
    index.publish({"a": None})
    assert dense.score("alpha text", [first.id]) == [] and index.vector_ids == {}


class CountingEncoder:
    """Wraps an encoder and records every text it is asked to embed."""

    def __init__(self, inner, name: str = "tiny"):
        self.inner, self.dim, self.name, self.texts = inner, inner.dim, name, []
        self.tokenizer = getattr(inner, "tokenizer", None)

    def encode(self, texts):
        self.texts += list(texts)
        return self.inner.encode(texts)


def test_dense_store_copies_the_vectors_of_cached_texts_and_embeds_the_rest(tiny_encoder):
    encoder = CountingEncoder(tiny_encoder)
    index = DenseIndex(Memory(DenseIndex.spec("chunks", encoder)), encoder)
    v1 = [chunk("a", 0, "alpha"), chunk("a", 1, "the longest text of all"), chunk("a", 2, "charlie text")]
    first = index.store(v1, partition="v1")
    assert encoder.texts == ["the longest text of all", "charlie text", "alpha"]  # longest first
    reuse = {index.key_of(c): vector_id for c, vector_id in zip(v1, first)}
    encoder.texts.clear()
    v2 = [chunk("a", 0, "a new first chunk"), chunk("a", 1, "alpha"), chunk("a", 2, "charlie text")]
    second = index.store(v2, partition="v2", reuse=reuse)
    assert encoder.texts == ["a new first chunk"] and index.embedded == 4  # moved or kept: copied
    assert len(set(first + second)) == 6 and len(index.memory) == 6
    got = index.memory.get(np.array([first[0], second[1], first[2], second[2]], dtype=np.int64)).keys
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[2], got[3])
    assert index.memory.get(np.array(second, dtype=np.int64)).payloads == [c.id for c in v2]
    assert index.key_of(v1[0]) == embedding_key("tiny", "alpha") != embedding_key("other-model", "alpha")
    assert len(index.key_of(v1[0])) == 64


def test_dense_index_embeds_the_text_it_is_given_for_a_chunk(tiny_encoder):
    encoder = CountingEncoder(tiny_encoder)
    index = DenseIndex(Memory(DenseIndex.spec("chunks", encoder)), encoder, embed_text=lambda c: f"{c.section}\n{c.text}")
    index.add([Chunk("a#0-x", "a", "body", "Title")])
    assert encoder.texts == ["Title\nbody"] and index.key_of(Chunk("a#0-x", "a", "body", "Title")) == \
        embedding_key("tiny", "Title\nbody")


def test_sentence_encoder_embeds_on_its_threads_and_restores_the_callers(tiny_encoder, monkeypatch):
    import torch

    encoder = SentenceEncoder(tiny_encoder.model, threads=2)
    seen, real = [], tiny_encoder.model.encode
    monkeypatch.setattr(tiny_encoder.model, "encode", lambda *a, **kw: (seen.append(torch.get_num_threads()),
                                                                         real(*a, **kw))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encoder.encode(["one text", "and another"]).shape == (2, encoder.dim)
        assert encoder.encode(["a query"]).shape == (1, encoder.dim)  # one text: the caller's threads
        assert seen == [2, 1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_document_scores_rank_documents_from_chunk_hits():
    hits = [Hit("a#0", "a", 0.9), Hit("b#0", "b", 0.8), Hit("b#1", "b", 0.7), Hit("c#0", "c", 0.6),
            Hit("b#2", "b", 0.5), Hit("a#1", "a", 0.1)]
    assert group_by_document(hits, 10) == [Hit("a#0", "a", 0.9), Hit("b#0", "b", 0.8), Hit("c#0", "c", 0.6)]
    assert group_by_document(hits, 2, "max") == [Hit("a#0", "a", 0.9), Hit("b#0", "b", 0.8)]
    by_sum = group_by_document(hits, 10, "sum")  # each chunk adds its score minus the lowest (0.1)
    assert [(h.chunk_id, h.document_id) for h in by_sum] == [("b#0", "b"), ("a#0", "a"), ("c#0", "c")]
    assert [h.score for h in by_sum] == pytest.approx([0.7 + 0.6 + 0.4, 0.8 + 0.0, 0.5])
    assert group_by_document([], 3, "sum") == []
    with pytest.raises(InvalidInput) as err:
        group_by_document(hits, 3, "mean")
    assert err.value.field == "score"


def test_dense_search_skips_vectors_not_published(tiny_encoder):
    """A new version's vectors stored before it is published (a collection before its commit) hold the
    unchanged chunks a second time: search skips them and still finds k distinct chunks (issue 12 #3)."""
    index = dense_index(tiny_encoder)
    dense = DenseRetriever(index)
    v1 = [chunk("a", i, f"alpha text number {i}") for i in range(4)] + [chunk("b", 0, "bravo")]
    index.add(v1)
    published = {h.chunk_id: h.score for h in dense.search("alpha text number 1", 5)}
    index.store(v1[:4] + [chunk("a", 4, "alpha text number 1")], partition="next")  # not published
    assert len(index.memory) == 10
    for k in (1, 3, 5, 8):
        hits = dense.search("alpha text number 1", k)
        assert len(hits) == min(k, 5) and len({h.chunk_id for h in hits}) == len(hits)
        assert all(published[h.chunk_id] == h.score for h in hits)


def test_dense_needs_a_matching_cosine_memory(tiny_encoder):
    spec = DenseIndex.spec("m", tiny_encoder)
    with pytest.raises(InvalidInput) as err:
        DenseIndex(Memory(spec.model_copy(update={"dim": 8})), tiny_encoder)
    assert err.value.field == "dim"
    with pytest.raises(InvalidInput) as err:
        DenseIndex(Memory(spec.model_copy(update={"metric": "l2"})), tiny_encoder)
    assert err.value.field == "metric"


def test_hybrid_modes_upsert_remove_and_bad_input(tiny_encoder):
    bm25, index = BM25Retriever(), dense_index(tiny_encoder)
    hybrid = HybridRetriever(bm25, DenseRetriever(index), depth=10)
    chunks = [chunk("paths", 0, "os.path.join joins paths"), chunk("json", 0, "json.loads parses JSON"),
              chunk("misc", 0, "unrelated prose about nothing")]
    assert add_to(index, bm25, chunks) == 3
    assert hybrid.search("os.path.join", 1, mode="bm25")[0].document_id == "paths"
    assert len(hybrid.search("os.path.join", 3, mode="dense")) == 3
    fused = hybrid.search("os.path.join", 3)
    assert fused[0].document_id == "paths" and len(fused) == 3
    assert fused == DEFAULT_FUSION(hybrid.rankings("os.path.join", 10), 3)
    assert index.remove("paths") == 1 and bm25.remove("paths") == 1
    assert "paths" not in {h.document_id for mode in ("bm25", "dense", "hybrid")
                           for h in hybrid.search("os.path.join", 5, mode)}
    for kwargs, field in [({"k": 0}, "k"), ({"k": -3}, "k"), ({"k": 2.5}, "k"), ({"mode": "sparse"}, "mode"),
                          ({"query": "  "}, "query"), ({"query": None}, "query")]:
        with pytest.raises(InvalidInput) as err:
            hybrid.search(**{"query": "json", "k": 3, **kwargs})
        assert err.value.field == field


def test_rankings_are_completed_with_each_retrievers_own_scores(tiny_encoder):
    bm25, index = BM25Retriever(), dense_index(tiny_encoder)
    dense = DenseRetriever(index)
    hybrid = HybridRetriever(bm25, dense, depth=2)
    add_to(index, bm25, [chunk(f"d{i}", 0, f"common words plus term{i}") for i in range(6)]
           + [chunk("x", 0, "nothing in common")])
    top_bm25, top_dense = bm25.search("term1 term2", 2), dense.search("term1 term2", 2)
    completed = hybrid.rankings("term1 term2", 2)
    assert completed[0][:2] == top_bm25 and completed[1][:2] == top_dense
    candidates = {h.chunk_id for h in top_bm25 + top_dense}
    for retriever, ranking in zip((bm25, dense), completed):
        assert {h.chunk_id for h in ranking} == candidates
        assert [h.score for h in ranking] == sorted((h.score for h in ranking), reverse=True)
        everything = {h.chunk_id: h.score for h in retriever.search("term1 term2", 7)}
        assert all(h.score == pytest.approx(everything.get(h.chunk_id, 0.0), abs=1e-5) for h in ranking)


def test_empty_retrievers_find_nothing(tiny_encoder):
    hybrid = HybridRetriever(BM25Retriever(), DenseRetriever(dense_index(tiny_encoder)))
    assert [hybrid.search("anything", 5, mode) for mode in ("bm25", "dense", "hybrid")] == [[], [], []]


def test_score_skips_unknown_chunks(tiny_encoder):
    bm25, index = BM25Retriever(), dense_index(tiny_encoder)
    for writer, retriever in ((bm25, bm25), (index, DenseRetriever(index))):
        known = chunk("a", 0, "alpha words")
        writer.add([known])
        assert [h.chunk_id for h in retriever.score("alpha", ["b#0-x", known.id])] == [known.id]
        with pytest.raises(InvalidInput):
            retriever.score("", [known.id])


def test_chunks_must_belong_to_their_document(tiny_encoder):
    for index in (BM25Retriever(), dense_index(tiny_encoder)):
        with pytest.raises(InvalidInput):
            index.add([Chunk("other#0-x", "doc", "text")])
        with pytest.raises(InvalidInput):
            index.add([chunk("doc", 0, "same"), chunk("doc", 0, "same")])


# --- real embedder, real docs -------------------------------------------------------------------

@pytest.mark.slow
def test_real_embedder_on_real_docs():
    encoder = SentenceEncoder()
    chunker = Chunker(encoder.tokenizer)
    names = ["library/os.path.rst.txt", "library/json.rst.txt", "library/zipfile.rst.txt",
             "tutorial/controlflow.rst.txt"]
    chunks = [c for name in names for c in chunker.chunk(name, (DOCS / name).read_bytes())]
    assert all(tokens(encoder.tokenizer, c.text) <= encoder.max_tokens for c in chunks)
    bm25, index = BM25Retriever(), dense_index(encoder)
    hybrid = HybridRetriever(bm25, DenseRetriever(index))
    assert add_to(index, bm25, chunks) == len(chunks)
    questions = {"How do I get the directory name of a pathname?": "library/os.path.rst.txt",
                 "How can I decode a JSON string into a Python object?": "library/json.rst.txt",
                 "How do I read a file out of a zip archive?": "library/zipfile.rst.txt",
                 "How do default argument values work in function definitions?": "tutorial/controlflow.rst.txt"}
    for question, document in questions.items():
        for mode in ("dense", "hybrid"):
            assert hybrid.search(question, 3, mode)[0].document_id == document, (question, mode)
