"""Writes retrievers/data/calibration.json.gz: the fixed texts the OpenVINO int8 embedder is calibrated on.

256 chunks (all-MiniLM-L6-v2 tokenizer, 256-token chunks as ingestion makes them) drawn with a fixed seed
from the Python 3.11 `library/` reference docs (Debian's python3.11-doc, PSF licence): technical prose with
code, like what users ingest, and none of the eval's answer documents (bench/eval_retrieval.py asks about the
glossary and the FAQ). Calibration sets only the int8 activation ranges (NNCF static quantisation); a fixed
file makes the int8 model the same on every machine.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/make_calibration.py
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from retrievers.chunking import Chunker
from retrievers.encoders import CALIBRATION

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
COUNT, SEED = 256, 16


def main() -> None:
    from transformers import AutoTokenizer

    from retrievers.dense import model_path

    chunker = Chunker(AutoTokenizer.from_pretrained(model_path()))
    chunks = [c.text for path in sorted(DOCS.glob("*.rst.txt")) for c in chunker.chunk(path.name, path.read_text())]
    texts = random.Random(SEED).sample(chunks, COUNT)
    data = {"source": "Python 3.11 docs, library/*.rst.txt (PSF licence), 256-token chunks, "
                      f"random.Random({SEED}).sample(chunks, {COUNT})", "texts": texts}
    with open(CALIBRATION, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # same bytes every run
        f.write(json.dumps(data, ensure_ascii=False, indent=0).encode())
    print(f"{len(texts)} of {len(chunks)} chunks -> {CALIBRATION} ({CALIBRATION.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
