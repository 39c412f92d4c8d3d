"""Token-aware chunking that respects the structure of Markdown, reST and plain text.

A document is cut into sections at its headings (no chunk spans two sections) and each section into
lines, each line remembering what separated it from the previous one (a blank line, a newline, or a
space when an overlong line was cut). Lines are packed greedily into chunks of at most `size` tokens
of the embedder's tokenizer, special tokens included, so the embedder never truncates. A chunk that
fills up ends at a paragraph start if one lies in its back half; when the cut falls inside a
paragraph, the next chunk repeats the trailing lines (at most `overlap` tokens) so the cut loses no
context. A line longer than a chunk is cut at sentence ends, then between words, then between tokens.

Work is linear in the document's length (issue 12): each line is tokenized once to count it, and a line
longer than a chunk once more, with offsets, to cut it (a line of more than 64K characters only this
once; pieces cut inside a word once more, to recount them); no regular expression here backtracks more
than linearly. Cutting at the token offsets of
the whole line gives the pieces that re-tokenizing each piece would give, because the tokenizer splits
text into words at spaces and punctuation before it cuts words into tokens (BERT's WordPiece, as all
such pre-tokenizing tokenizers); only a cut inside a word can change the tokens next to it.

A section's heading trail always starts with the document's title, its first heading: a later heading at
the title's level or above (reST files that reuse the title's adornment further down, several `#`
headings in Markdown) becomes a child of the title, not its sibling.

Contextual chunks (`Chunker(..., context="title"|"trail")`, bench/results/retrieval_v2.md): the text
embedded and BM25-indexed for a chunk is `"<title>\n<text>"` or `"<title> > <section> > ...\n<text>"`
(`Chunker.contextual`), the prefix cut to `context_tokens` tokens (middle headings dropped first), and
chunks are packed `context_tokens` smaller so the prefixed text still fits the embedder's window. The
chunk's own text (what a search returns, what its id hashes) stays plain.

Chunk ids are `<document_id>#<n>-<hash>`, n the chunk's position and hash 12 hex digits of the sha1
of its text, so chunking an unchanged document again gives the same ids, and an edit changes the ids
of exactly the chunks whose text changed or moved.
"""
from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from memsvc.contract import InvalidInput, check_document_id
from retrievers.base import Chunk

Format = Literal["markdown", "rst", "text"]
Context = Literal["title", "trail"]
CONTEXTS = ("title", "trail")

DEFAULT_SIZE = 256  # all-MiniLM-L6-v2's window; chosen by bench/eval_retrieval.py
DEFAULT_OVERLAP = 32
DEFAULT_CONTEXT_TOKENS = 32  # the heading prefix of a contextual chunk, at most

MD_FENCE = re.compile(r"^\s*(```|~~~)")
MD_ATX = re.compile(r"^(#{1,6})\s++(.*\S)")  # possessive: no backtracking over a long run of spaces
MD_SETEXT = re.compile(r"^(=+|-+)\s*$")
RST_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
LONG_LINE = 1 << 16  # characters: a longer line is tokenized once, with offsets, not counted first
INSIDE_WORD_SLACK = 2  # tokens a piece starting inside a word may gain when tokenized alone (seen: 1)


@dataclass
class Line:
    """A unit of packing: its text, its token count, and the separator before it."""

    text: str
    tokens: int
    sep: str = "\n"


@dataclass
class Section:
    """A heading trail ("os > Files and Directories") and the lines under it, its title lines first."""

    trail: str
    lines: list[str]
    titles: int = 0

    @property
    def empty(self) -> bool:
        return sum(1 for line in self.lines if line.strip()) <= self.titles


def decode(data: str | bytes, field: str = "text") -> str:
    """Text as str; bytes must be UTF-8 (a leading BOM is dropped)."""
    if isinstance(data, str):
        return data
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidInput(f"{field} must be text or UTF-8 bytes, got {type(data).__name__}", field)
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{field} is not valid UTF-8: byte {data[exc.start]:#04x} at offset {exc.start}",
                           field) from None


def detect_format(document_id: str, text: str) -> Format:
    """By file extension, else by the headings the text contains."""
    name = document_id.lower()
    if name.endswith((".md", ".markdown")):
        return "markdown"
    if name.endswith((".rst", ".rst.txt", ".rest")):
        return "rst"
    lines = text.splitlines()
    if any(is_rst_title(line, nxt) for line, nxt in pairwise(lines)):
        return "rst"
    if any(MD_ATX.match(line) for line in lines):
        return "markdown"
    return "text"


def atx_title(match: re.Match) -> str:
    """The title of a Markdown ATX heading, without a closing sequence of '#' ("## Setup ##" -> "Setup")."""
    title = match.group(2)
    bare = title.rstrip("#")
    return bare.rstrip() if bare != title and bare and bare[-1].isspace() else title


def is_rst_title(line: str, under: str) -> bool:
    """reST title: unindented text over a line of one repeated punctuation character (4+, or as long)."""
    return (bool(line.strip()) and not line[0].isspace() and not RST_ADORNMENT.match(line)
            and RST_ADORNMENT.match(under) is not None and len(under.rstrip()) >= min(len(line.rstrip()), 4))


def split_sections(text: str, fmt: Format) -> list[Section]:
    """Cut text at its headings; each section starts with its heading's title line (adornments dropped).
    A heading with nothing under it before the next heading is carried into the next section."""
    lines = text.splitlines()
    sections = [Section("", [])]
    stack: list[tuple[int, str]] = []  # the document's title, once seen, at level -1: never popped
    styles: list[str] = []  # reST: heading levels in order of first appearance
    fenced = False

    def open_section(level: int, title: str, line: str) -> None:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title) if stack else (-1, title))
        carried = sections.pop() if sections[-1].empty and sections[-1].titles else Section("", [])
        titles = [t for t in carried.lines if t.strip()]
        sections.append(Section(" > ".join(t for _, t in stack), [*titles, line], len(titles) + 1))

    i = 0
    while i < len(lines):
        line, nxt = lines[i], lines[i + 1] if i + 1 < len(lines) else ""
        if fmt == "markdown":
            if MD_FENCE.match(line):
                fenced = not fenced
            atx = None if fenced else MD_ATX.match(line)
            if atx:
                open_section(len(atx.group(1)), atx_title(atx), line)
                i += 1
                continue
            if not fenced and line.strip() and MD_SETEXT.match(nxt) and (i == 0 or not lines[i - 1].strip()):
                open_section(1 if nxt.startswith("=") else 2, line.strip(), line.strip())
                i += 2
                continue
        elif fmt == "rst" and is_rst_title(line, nxt):
            over = i > 0 and RST_ADORNMENT.match(lines[i - 1]) and lines[i - 1][0] == nxt[0]
            style = ("over" if over else "") + nxt[0]
            if style not in styles:
                styles.append(style)
            if over and sections[-1].lines and sections[-1].lines[-1] == lines[i - 1]:
                sections[-1].lines.pop()
            open_section(styles.index(style), line.strip(), line.strip())
            i += 2
            continue
        sections[-1].lines.append(line)
        i += 1
    return [s for s in sections if any(line.strip() for line in s.lines)]


class Chunker:
    """Chunks documents for one tokenizer (the embedder's, so chunks fit its window)."""

    def __init__(self, tokenizer, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP,
                 context: Context | None = None, context_tokens: int = DEFAULT_CONTEXT_TOKENS):
        if context not in (None, *CONTEXTS):
            raise InvalidInput(f"context must be one of {', '.join(CONTEXTS)} or none, got {context!r}", "context")
        self.tokenizer, self.context = tokenizer, context
        self.context_tokens = context_tokens if context else 0
        self.budget = size - tokenizer.num_special_tokens_to_add() - self.context_tokens
        if self.budget < 8:
            raise InvalidInput(f"chunk size {size} leaves fewer than 8 tokens for text", "size")
        if not 0 <= overlap <= self.budget // 2:
            raise InvalidInput(f"overlap must be in 0..{self.budget // 2} for chunk size {size}", "overlap")
        self.size, self.overlap = size, overlap

    def contextual(self, chunk: Chunk) -> str:
        """The text embedded and BM25-indexed for a chunk: its text, after its document title
        (`context="title"`) or heading trail (`"trail"`) and a newline; with no context, its text alone.
        The prefix is at most `context_tokens` tokens: middle headings are dropped first
        ("A > B > C > D" -> "A > D"), then the rest is cut after its last whole token that fits."""
        if not self.context or not chunk.section:
            return chunk.text
        parts = chunk.section.split(" > ")
        if self.context == "title":
            parts = parts[:1]
        prefix = " > ".join(parts)
        while len(parts) > 2 and self.count([prefix])[0] > self.context_tokens:
            del parts[1]
            prefix = " > ".join(parts)
        offsets = self.tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > self.context_tokens:
            prefix = prefix[:offsets[self.context_tokens - 1][1]]
        return f"{prefix}\n{chunk.text}"

    def chunk(self, document_id: str, text: str | bytes, fmt: Format | None = None) -> list[Chunk]:
        """The chunks of one document, in order."""
        check_document_id(document_id)
        text = decode(text)
        if not text.strip():
            raise InvalidInput(f"document {document_id!r} is empty", "text")
        fmt = fmt or detect_format(document_id, text)
        chunks = []
        for section in split_sections(text, fmt):
            for lines in self._pack(self._lines(section.lines)):
                body = lines[0].text + "".join(line.sep + line.text for line in lines[1:])
                digest = hashlib.sha1(body.encode()).hexdigest()[:12]
                chunks.append(Chunk(f"{document_id}#{len(chunks)}-{digest}", document_id, body, section.trail))
        return chunks

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens left out."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _lines(self, raw: list[str]) -> list[Line]:
        """Non-blank lines with their token counts; overlong lines cut into pieces that fit."""
        lines, sep = [], "\n"
        for text in raw:
            text = text.rstrip()
            if not text.strip():
                sep = "\n\n"
                continue
            lines.append(Line(text, 0, sep))
            sep = "\n"
        short = [line for line in lines if len(line.text) <= LONG_LINE]
        for start in range(0, len(short), 4096):
            batch = short[start:start + 4096]
            for line, n in zip(batch, self.count([line.text for line in batch])):
                line.tokens = n
        fitted = []
        for line in lines:
            if len(line.text) <= LONG_LINE and line.tokens <= self.budget:
                fitted.append(line)
                continue
            pieces = [(piece, n) for piece, n in self._fit(line.text) if piece]
            for j, (piece, n) in enumerate(pieces):
                fitted.append(Line(piece, n, line.sep if j == 0 else " "))
        return fitted

    def _fit(self, text: str) -> list[tuple[str, int]]:
        """Cut text into pieces of at most `budget` tokens: halve its run of sentences until each part
        fits, then cut a sentence too long alone after the last word (else token) within the budget.
        One tokenizer call over the text (one more for pieces cut inside a word): linear time."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in enc["offset_mapping"]]
        if len(starts) <= self.budget:  # a line of more than LONG_LINE characters that fits
            return [(text, len(starts))]
        words = enc.word_ids()
        ends = [(m.start(), m.end()) for m in SENTENCE_END.finditer(text)]  # the spaces after sentence ends
        begin = len(text) - len(text.lstrip())  # a cut line loses its indentation
        spans = list(zip([begin] + [b for _, b in ends], [a for a, _ in ends] + [len(text)]))  # the sentences
        pieces: list[tuple[str, int, bool]] = []  # text, tokens, whether a cut inside a word touches it

        def token(pos: int) -> int:
            """The index of the first token at or after character pos."""
            return bisect.bisect_left(starts, pos)

        def sentences(lo: int, hi: int) -> None:
            first, last = token(spans[lo][0]), token(spans[hi - 1][1])
            if last - first <= self.budget:
                pieces.append((" ".join(text[a:b] for a, b in spans[lo:hi]), last - first, False))
            elif hi - lo > 1:
                sentences(lo, (lo + hi) // 2)
                sentences((lo + hi) // 2, hi)
            else:
                cut_words(*spans[lo], first, last)

        def cut_words(pos: int, end: int, first: int, last: int) -> None:
            inside, limit = False, self.budget
            while last - first > limit:
                cut = next((j for j in range(first + limit, first, -1) if words[j] != words[j - 1]), first + limit)
                was_inside, inside = inside, words[cut] == words[cut - 1]
                pieces.append((text[pos:starts[cut]].rstrip(), cut - first, was_inside or inside))
                pos, first = starts[cut], cut
                limit = self.budget - (INSIDE_WORD_SLACK if inside else 0)
            pieces.append((text[pos:end], last - first, inside))

        sentences(0, len(spans))
        touched = [piece for piece, _, inside in pieces if inside]
        recount = iter(self.count(touched) if touched else [])
        fitted = []
        for piece, n, inside in pieces:
            n = next(recount) if inside else n
            fitted.extend([(piece, n)] if n <= self.budget else self._fit(piece))
        return fitted

    def _pack(self, lines: list[Line]) -> Iterator[list[Line]]:
        """Greedy packing into chunks of at most `budget` tokens, with overlap where a paragraph is cut."""
        start = 0
        while start < len(lines):
            end, total = start, 0
            while end < len(lines) and total + lines[end].tokens <= self.budget:
                total += lines[end].tokens
                end += 1
            if end < len(lines):
                end = self._cut(lines, start, end)
            yield lines[start:end]
            nxt = end
            if end < len(lines) and lines[end].sep != "\n\n":
                repeated = 0
                while nxt - 1 > start and repeated + lines[nxt - 1].tokens <= self.overlap:
                    nxt -= 1
                    repeated += lines[nxt].tokens
            start = nxt

    def _cut(self, lines: list[Line], start: int, end: int) -> int:
        """Where a full chunk lines[start:end] ends: before the last unindented paragraph (a heading-less
        block such as a reST directive) in its back half, else before the last paragraph there, else at end."""
        back_half, kept = [], sum(line.tokens for line in lines[start:end])
        for i in range(end, start, -1):
            if kept < self.budget // 2:
                break
            back_half.append(i)
            kept -= lines[i - 1].tokens
        for starts_block in (lambda line: not line.text[0].isspace(), lambda line: True):
            for i in back_half:
                if lines[i].sep == "\n\n" and starts_block(lines[i]):
                    return i
        return end


class CountingTokenizer:
    """Wraps a Hugging Face tokenizer and counts the chunker's work through it: `calls` (how many times it
    was called) and `chars` (the characters it was given, summed over a batch's texts). Everything else a
    `Chunker` uses is passed through. For tests and benchmarks of chunking cost (issue 12)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def __call__(self, text: str | list[str], **kwargs: Any) -> Any:
        self.calls += 1
        self.chars += len(text) if isinstance(text, str) else sum(map(len, text))
        return self.tokenizer(text, **kwargs)

    def num_special_tokens_to_add(self) -> int:
        return self.tokenizer.num_special_tokens_to_add()
