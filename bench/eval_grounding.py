"""Grounding of `ask`: do the passages an answer was given (and cites) include the gold document, and does
the answer say the gold answer's key phrase?

Questions: half B of bench/eval_retrieval.py's questions (glossary "What is a generator?" and FAQ
questions, each answered by one known document). Every one of them is searched (the k passages `ask`
would be given: "given" below); a seeded subset of `--n` of them, as many of each kind, is answered
(SmolLM2 on a CPU takes minutes per answer on a loaded machine). Corpus: the answer
documents of *all* that eval's questions (so answers are each other's distractors) plus the reST sources of
`--dirs` (default `tutorial`), ingested into a fresh collection with the real embedder; a smaller and
easier corpus than the retrieval eval's 780 documents, which does not fit the CPU time of a loaded 2-core
machine. `--data-dir` keeps the ingested collection for the next run (unchanged documents are skipped).
The subset is asked through `Collection.ask` (hybrid search, k passages, SmolLM2 greedy, `--max-new-tokens`).

Reported per kind and overall:
- given: the gold document is among the k passages of the question's search (for the answered subset:
  among the passages `Answer.citations` says the model was given);
- cited: the answer cites ([n]) a passage of the gold document;
- key phrase: where the gold answer has one, the answer contains it (case-insensitive). The key phrase is
  the first inline literal (``x``) or cross-reference target (:func:`x`, :term:`text <target>` -> text)
  of the gold answer: an objective, checkable fact of the answer; questions without one are left out
  of that column (their count is shown).

    HF_HUB_OFFLINE=1 PYTHONPATH=. nice -n 10 .venv/bin/python bench/eval_grounding.py [--n 24] [--k 4]
        [--max-new-tokens 64] [--dirs tutorial] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from eval_retrieval import KINDS, Query, corpus, faq, glossary, split

LITERAL = re.compile(r"``([^`]+)``|:([\w:]+):`~?([^`<]+?)(?:\s*<[^>]*>)?`")


def key_phrase(answer: str) -> str | None:
    """The first inline literal or cross-reference text of a reST answer, if any ("``yield``" -> "yield",
    ":func:`~os.path.join`" -> "os.path.join"); :ref: labels, code of several lines or over 40
    characters and phrases under 2 characters do not count. None if there is none."""
    for match in LITERAL.finditer(answer):
        if match.group(2) == "ref":
            continue
        phrase = (match.group(1) or match.group(3) or "").strip().rstrip("()")
        if 2 <= len(phrase) <= 40 and "\n" not in phrase:
            return phrase
    return None


def held_out(queries: list[Query], seed: int) -> list[Query]:
    """Half B of the questions (eval_retrieval.split)."""
    return [queries[i] for i in split(queries, seed)["B"]]


def pick(queries: list[Query], n: int, seed: int) -> list[Query]:
    """n questions of half B, n // 2 of each kind, in a seeded order."""
    chosen = []
    for kind in KINDS:
        members = [q for q in held_out(queries, seed) if q.kind == kind]
        random.Random(seed + 1).shuffle(members)
        chosen += members[: n // len(KINDS)]
    return chosen


def rate(rows: list[dict], column: str) -> str:
    values = [r[column] for r in rows if r[column] is not None]
    return f"{sum(values)}/{len(values)} ({sum(values) / len(values):.0%})" if values else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="questions (half glossary, half FAQ)")
    ap.add_argument("--k", type=int, default=4, help="passages per answer")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dirs", nargs="*", default=["tutorial"], help="distractor doc directories (none: no "
                    "distractors but the other answers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every question's row here")
    ap.add_argument("--data-dir", type=Path, help="keep the ingested collection here (default: a temporary dir)")
    args = ap.parse_args()

    from memsvc.config import Settings
    from memsvc.contract import Document
    from memsvc.service import Service

    queries = glossary() + faq()
    chosen = pick(queries, args.n, args.seed)
    documents = [Document(q.document_id, q.answer) for q in queries]
    if args.dirs:  # corpus([]) would be every directory
        documents += [Document(doc_id, text) for doc_id, text in corpus(args.dirs).items()]
    rows, searched = [], []
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Settings(data_dir=args.data_dir or Path(tmp) / "data"))
        try:
            col = (service.collection("grounding") if "grounding" in service.list_collections()
                   else service.create_collection("grounding"))
            started = time.perf_counter()
            chunks = sum(col.upsert(documents[i:i + 64]).chunks for i in range(0, len(documents), 64))
            print(f"ingested {len(documents)} documents, {chunks} chunks in {time.perf_counter() - started:.0f} s "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            for q in held_out(queries, args.seed):
                hits = col.search(q.text, k=args.k)
                searched.append({"kind": q.kind, "given": any(h.document_id == q.document_id for h in hits)})
            print(f"| half B, searched only | n | gold passage among the k={args.k} |\n|---|---:|---:|")
            for kind in (*KINDS, "all"):
                part = [r for r in searched if kind in ("all", r["kind"])]
                print(f"| {kind} | {len(part)} | {rate(part, 'given')} |", flush=True)
            for n, q in enumerate(chosen, start=1):
                started = time.perf_counter()
                answer = col.ask(q.text, k=args.k, max_new_tokens=args.max_new_tokens)
                phrase = key_phrase(q.answer)
                rows.append({
                    "kind": q.kind, "question": q.text, "gold": q.document_id, "answer": answer.answer,
                    "passages": [c.document_id for c in answer.citations],
                    "given": any(c.document_id == q.document_id for c in answer.citations),
                    "cited": any(c.document_id == q.document_id and c.cited for c in answer.citations),
                    "cites_any": any(c.cited for c in answer.citations),
                    "key_phrase": phrase,
                    "says_key_phrase": None if phrase is None else phrase.lower() in answer.answer.lower(),
                    "seconds": round(time.perf_counter() - started, 1), "load": os.getloadavg()[0]})
                print(f"{n}/{len(chosen)} {rows[-1]['seconds']} s given={rows[-1]['given']} "
                      f"cited={rows[-1]['cited']} key={phrase!r}:{rows[-1]['says_key_phrase']}",
                      file=sys.stderr, flush=True)
        finally:
            service.close()
    print(f"| questions | n | gold passage given (k={args.k}) | gold passage cited | answer cites any | "
          f"answer says the key phrase | s per answer |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in (*KINDS, "all"):
        part = [r for r in rows if kind in ("all", r["kind"])]
        seconds = sum(r["seconds"] for r in part) / max(len(part), 1)
        print(f"| {kind} | {len(part)} | {rate(part, 'given')} | {rate(part, 'cited')} | {rate(part, 'cites_any')} | "
              f"{rate(part, 'says_key_phrase')} | {seconds:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"searched": searched, "answered": rows}, indent=1))


if __name__ == "__main__":
    main()
