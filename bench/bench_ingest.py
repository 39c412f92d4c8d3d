"""Ingestion throughput through a collection (chunk, embed, store, commit), in-process, real embedder.

Ingests the Python docs' reST files of one directory (default `tutorial`: 17 files, 395 chunks of at most
256 tokens, 177 on average) into a fresh collection of a temporary data dir, in batches of 16 documents
as `memsvc ingest` sends them, and reports chunks/s (wall) and chunks per CPU-second of this process.
Then it edits every document (one line appended at its end, i.e. its last chunk changes) and ingests
again: with the embedding cache only the changed chunks are embedded. The load average is printed
beside every number (this machine is shared). `--backend` picks the embedder as MEMSVC_EMBED_BACKEND
does (`retrievers.encoders.make_embedder`; exported models in MEMSVC_MODEL_CACHE, built there if missing).

Run it against any checkout by PYTHONPATH (the code measured is the one imported):

    HF_HUB_OFFLINE=1 PYTHONPATH=. nice -n 10 .venv/bin/python bench/bench_ingest.py [--dir tutorial] [--json F]
        [--no-edit] [--backend torch|openvino|openvino-int8]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
BATCH = 16  # documents per upsert, as `memsvc ingest --batch` defaults


def ingest(col, documents) -> dict[str, float]:
    """Upsert the documents BATCH at a time; chunks, wall seconds and CPU seconds taken."""
    wall, cpu, chunks = time.perf_counter(), time.process_time(), 0
    for start in range(0, len(documents), BATCH):
        chunks += col.upsert(documents[start:start + BATCH]).chunks
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"chunks": chunks, "embedded": getattr(col.dense, "embedded", None), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "chunks_per_s": round(chunks / wall, 2), "chunks_per_cpu_s": round(chunks / cpu, 2),
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="tutorial", help="docs directory under " + str(DOCS))
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--no-edit", action="store_true", help="the first ingest only")
    ap.add_argument("--backend", default="torch", choices=["torch", "openvino", "openvino-int8"])
    args = ap.parse_args()

    import torch

    import memsvc
    from memsvc.config import Settings
    from memsvc.contract import Document
    from memsvc.service import Service
    from retrievers.encoders import embedder_name, make_embedder

    files = sorted((DOCS / args.dir).glob("*.rst.txt"))
    documents = [Document(f.name, f.read_text()) for f in files]
    encoder = make_embedder(embedder_name(args.backend), Settings().model_cache_dir / "embedders")
    encoder.encode(["warm up", "the embedder"])
    result = {"code": str(Path(memsvc.__file__).parent.parent), "files": len(files), "embedder": encoder.name,
              "torch_threads_at_start": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Settings(data_dir=Path(tmp) / "data"), encoder=lambda: encoder)
        try:
            col = service.create_collection("bench")
            result["first"] = ingest(col, documents)
            print("first ingest:", result["first"], flush=True)
            if not args.no_edit:
                edited = [Document(d.id, d.text + "\n\nEdited for the re-ingest benchmark.\n") for d in documents]
                before = getattr(col.dense, "embedded", 0) or 0
                result["edited"] = ingest(col, edited)
                if result["edited"]["embedded"] is not None:
                    result["edited"]["embedded"] -= before
                print("every document edited at its end:", result["edited"], flush=True)
        finally:
            service.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
