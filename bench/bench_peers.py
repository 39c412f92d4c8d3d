"""memsvc against its peers (issue 18): memsvc through REST and in-process, Chroma embedded and as a
server (HttpClient), pgvector on PostgreSQL 15, on the same real SmolLM2 hidden states.

    nice -n 5 .venv/bin/python bench/bench_peers.py                    # 3 rounds, every system
    nice -n 5 .venv/bin/python bench/bench_peers.py --systems memsvc-inproc,memsvc-rest --tag memsvc
    nice -n 5 .venv/bin/python bench/bench_peers.py --systems memsvc-rest --rounds 1 --profile 20

Data: the final-norm hidden states (576-d, the kNN-LM key) of SmolLM2-135M over the Python docs
(library/*.rst.txt in a seeded order): the first 100,000 positions are stored, 1,000 positions of the
following documents are the queries. Computed once with `lm.knnlm.encode` and cached in bench/out/peers/.

Each system, in its own process: insert all entries in batches of 1,000 (insert/s), then per setting
recall@32 over every query against exact search, QPS at batch 1 and batch 64 (one client, one call at a
time) and per-call p50/p99 at batch 1. Settings: each system's defaults, and its smallest setting that
reaches recall@32 >= 0.97 (HNSW ef_search swept upwards over SWEEP on the built index). memsvc sets
ef_search per memory (set_search_params): memsvc-inproc finds it (first in round 1) and memsvc-rest creates its
HNSW memory with it. memsvc is also measured as before issue 18 (FAISS on its default OpenMP threads for
every search: rows marked "before") on the same index, so the per-call thread rule is an A/B in one run.

Durability is each system's own default on acknowledgement: memsvc fsyncs its log on every add, pgvector
commits every batch (synchronous_commit on), Chroma writes its log as it ships.

Rounds run the systems in rotated order; the table is the median of the rounds. Peers live in their own
virtualenv (bench/.venv-peers, made here); pgvector is built from its source in bench/out/peers/
(see `pgvector_source`) when PostgreSQL lacks it, and skipped with a note when it cannot be built.
Writes bench/results/peers[-TAG].{json,png}; `--profile S` samples the memsvc REST server with py-spy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_PEERS_WORK", HERE / "out" / "peers"))  # another folder: a smoke run
RESULTS = HERE / "results"
PEERS_VENV = HERE / ".venv-peers"
PEERS = ["chromadb==1.5.9", "psycopg[binary]>=3.2", "pgvector>=0.3", "py-spy>=0.4"]
PGVECTOR_VERSION = "0.8.6"
PG_DSN = os.environ.get("BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PG_DB = "memsvc_peers"  # a database of its own, so the project's tests never see the table
LIBRARY = Path("/usr/share/doc/python3.11/html/_sources/library")
N, NQ, DIM, K = 100_000, 1_000, 576, 32
INSERT_BATCH, QUERY_BATCH = 1_000, 64
TARGET = 0.97
SWEEP = (32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512)
SYSTEMS = ("memsvc-rest", "memsvc-inproc", "chroma-server", "chroma-embedded", "pgvector")


# --- data: real hidden states and exact neighbours (project venv) -------------------------------

def prepare_data() -> None:
    """Cache keys [N, 576], queries [NQ, 576] (float32) and each query's exact k-th distance."""
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "keys.npy").exists():
        encode_hidden_states()
    if not (WORK / "kth.npy").exists():
        import faiss
        keys, queries = np.load(WORK / "keys.npy"), np.load(WORK / "queries.npy")
        index = faiss.IndexFlatL2(DIM)
        index.add(keys)
        _, ids = index.search(queries, K)
        np.save(WORK / "kth.npy", sq_distances(keys, queries, ids).max(axis=1))


def encode_hidden_states() -> None:
    """SmolLM2's final-norm hidden states over the docs: the first N positions, then NQ query positions
    drawn from the next 20,000 (other documents)."""
    from lm.knnlm import encode
    from lm.model import load_model

    model, tok = load_model()
    files = sorted(LIBRARY.glob("*.rst.txt"))
    random.Random(18).shuffle(files)
    data, pool, total = [], [], 0
    for f in files:
        ids = tok(f.read_text()).input_ids
        if len(ids) < 2:
            continue
        target = data if total < N else pool
        if target is data:
            ids = ids[: N - total + 1]
        target.append(ids)
        total += len(ids) - 1
        if total >= N + 20_000:
            break
    t = time.perf_counter()
    states = [enc.keys["final-norm"] for enc in encode(model, data + pool, logprobs=False)]
    print(f"encoded {total:,} tokens in {time.perf_counter() - t:.0f} s", flush=True)
    keys = np.concatenate(states[: len(data)]).astype(np.float32)
    rest = np.concatenate(states[len(data):]).astype(np.float32)
    queries = rest[np.sort(np.random.default_rng(0).choice(len(rest), NQ, replace=False))]
    assert keys.shape == (N, DIM), keys.shape
    np.save(WORK / "queries.npy", queries)
    np.save(WORK / "keys.npy", keys)


def sq_distances(keys: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared L2 between each query and its found entries [m, k], computed directly (+inf where id < 0)."""
    d = ((keys[np.maximum(ids, 0)] - queries[:, None, :]) ** 2).sum(axis=-1, dtype=np.float32)
    return np.where(ids < 0, np.inf, d)


# --- the peers' virtualenv and pgvector -----------------------------------------------------------

def peers_python() -> Path:
    """bench/.venv-peers/bin/python with the peers installed (never into the project's venv)."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != "\n".join(PEERS):
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
        stamp.write_text("\n".join(PEERS))
    return python


def pgvector_source() -> Path:
    """Where pgvector's source tree is expected: bench/out/peers/pgvector-VERSION (tag vVERSION of
    github.com/pgvector/pgvector, unpacked there by hand: no registry here ships it)."""
    return WORK / f"pgvector-{PGVECTOR_VERSION}"


def ensure_pgvector() -> str | None:
    """None when PostgreSQL offers the `vector` extension (building it from source if needed), else why not."""
    def available() -> bool:
        out = subprocess.run(["psql", PG_DSN, "-Atc", "SELECT 1 FROM pg_available_extensions WHERE name='vector'"],
                             check=False, capture_output=True, text=True)
        return out.stdout.strip() == "1"
    if shutil.which("psql") is None:
        return "psql not found: no PostgreSQL client here"
    if available():
        return None
    src = pgvector_source()
    if not (src / "Makefile").exists():
        return f"pgvector is not installed and its source is not in {src}"
    server_include = subprocess.run(["pg_config", "--includedir-server"], check=False, capture_output=True, text=True).stdout
    if not Path(server_include.strip(), "postgres.h").exists():  # PGXS needs the server headers
        major = subprocess.run(["pg_config", "--version"], check=False, capture_output=True, text=True).stdout.split()[1]
        subprocess.run(["apt-get", "install", "-y", "-qq", f"postgresql-server-dev-{major.split('.')[0]}"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False, capture_output=True)
    build = subprocess.run(f"make -C {src} && make -C {src} install", shell=True, check=False, capture_output=True,
                           text=True)
    if build.returncode or not available():
        return f"pgvector {PGVECTOR_VERSION} did not build: {build.stderr.strip()[-300:]}"
    return None


# --- measuring (every system's process) -----------------------------------------------------------

def insert_rate(add, keys: np.ndarray) -> float:
    """Entries per second for adds of INSERT_BATCH entries with ids 0..N-1, each acknowledged."""
    t = time.perf_counter()
    for s in range(0, len(keys), INSERT_BATCH):
        add(s, keys[s:s + INSERT_BATCH])
    return len(keys) / (time.perf_counter() - t)


def recall(search, keys: np.ndarray, queries: np.ndarray, kth: np.ndarray, subset: int | None = None) -> float:
    """recall@K against exact search: the share of the found entries within each query's exact k-th
    distance (ties with the k-th neighbour count as found). search(q [m, d]) -> ids [m, K]."""
    queries, kth = queries[:subset], kth[:subset]
    ids = np.concatenate([search(queries[s:s + QUERY_BATCH]) for s in range(0, len(queries), QUERY_BATCH)])
    return float((sq_distances(keys, queries, ids) <= kth[:, None]).sum() / (len(queries) * K))


def timed(search, queries: np.ndarray, batch: int, seconds: float) -> dict:
    """QPS (queries/s) and per-call p50/p99 (ms) of one client calling search(batch of queries) in turn."""
    lat, i = [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 10:
        start = (i * batch) % (len(queries) - batch + 1)
        t = time.perf_counter()
        search(queries[start:start + batch])
        lat.append(time.perf_counter() - t)
        i += 1
    lat = np.array(lat)
    return {"qps": batch * len(lat) / lat.sum(), "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "calls": len(lat)}


def measure(system: str, setting: str, search, data: dict, seconds: float, **extra) -> dict:
    r = recall(search, data["keys"], data["queries"], data["kth"])
    one, batch = timed(search, data["queries"], 1, seconds), timed(search, data["queries"], QUERY_BATCH, seconds)
    row = {"system": system, "setting": setting, **extra, "recall": r, "qps_1": one["qps"],
           "qps_64": batch["qps"], "p50_ms_1": one["p50_ms"], "p99_ms_1": one["p99_ms"],
           "calls_1": one["calls"], "calls_64": batch["calls"], "load": os.getloadavg()[0]}
    print(f"  {system:<16} {setting:<22} recall {r:.3f}  b1 {one['qps']:8,.0f} q/s  b64 {batch['qps']:8,.0f} q/s"
          f"  p50/p99 {one['p50_ms']:.2f}/{one['p99_ms']:.2f} ms", flush=True)
    return row


def smallest_ef(set_ef, search, data: dict) -> int:
    """The smallest ef_search of SWEEP whose recall@K over all queries reaches TARGET (the largest if none)."""
    for ef in SWEEP:
        set_ef(ef)
        if recall(search, data["keys"], data["queries"], data["kth"]) >= TARGET:
            return ef
    return SWEEP[-1]


def load_data() -> dict:
    return {name: np.load(WORK / f"{name}.npy") for name in ("keys", "queries", "kth")}


# --- the systems (each runs in a `worker` process) -------------------------------------------------

# The server as shipped before issue 18: FAISS on the process' default OpenMP threads for every search.
BEFORE_SERVER = ("import contextlib, sys; import memsvc.store.index as fx; "
                 "fx.threads_for = lambda n: contextlib.nullcontext(0); from memsvc.cli.commands import app; "
                 "sys.argv[0] = 'memsvc'; app()")


def threads_as_before(on: bool) -> None:
    """In this process: searches on the default OpenMP threads (as before issue 18) or by the per-call rule."""
    import contextlib

    import memsvc.store.index as fx
    if not hasattr(fx, "_rule"):
        fx._rule = fx.threads_for
    fx.threads_for = (lambda n: contextlib.nullcontext(0)) if on else fx._rule


def run_memsvc(rest: bool, ef: int, data: dict, seconds: float, profile: float) -> list[dict]:
    """memsvc at its default (flat) and HNSW (m 32) at `ef`, each measured with the per-call thread rule
    and again as before it (FAISS on its default threads) on the same index. In-process also at the default
    ef_search, and `ef` = 0 means: find it here (the smallest reaching TARGET), on this build."""
    from memsvc.store import Memory, MemorySpec

    name = "memsvc-rest" if rest else "memsvc-inproc"
    default_ef = MemorySpec.model_fields["ef_search"].default
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        server = Path(tmp) / "server"
        proc = None
        try:
            if rest:
                proc, client = start_memsvc(server, before=False)
                flat = client.create_memory("flat", dim=DIM)
            else:
                flat = Memory.create(MemorySpec(name="flat", dim=DIM), Path(tmp) / "flat")
            rows.append(measure_memory(name, "flat (default)", flat, data, seconds))
            if rest:
                hnsw = client.create_memory("hnsw", dim=DIM, index="hnsw", ef_search=ef)
                rows.append(measure_memory(name, f"hnsw m32 ef{ef}", hnsw, data, seconds))
                if profile:
                    rows[-1]["profile"] = profile_server(proc.pid, hnsw, data, profile)
                stop(proc)  # a clean stop snapshots both memories; the "before" server opens them as they are
                proc, client = start_memsvc(server, before=True)
                flat, hnsw = client.memory("flat"), client.memory("hnsw")
            else:
                hnsw = Memory.create(MemorySpec(name="hnsw", dim=DIM, index="hnsw"), Path(tmp) / "hnsw")
                rows.append(measure_memory(name, f"hnsw m32 ef{default_ef} (default)", hnsw, data, seconds))

                def set_ef(value: int) -> None:  # the memory's own ef_search from now on (issue 18 #3)
                    hnsw.set_search_params(ef_search=value)
                ef = ef or smallest_ef(set_ef, lambda q: hnsw.search(q, K).ids, data)
                set_ef(ef)
                rows.append(measure(name, f"hnsw m32 ef{ef}", lambda q: hnsw.search(q, K).ids, data, seconds,
                                    insert_per_s=rows[-1]["insert_per_s"]))
                threads_as_before(True)
            for mem, row in ((flat, rows[0]), (hnsw, rows[-1])):
                rows.append(measure(name, row["setting"] + ", before", lambda q, mem=mem: mem.search(q, K).ids,
                                    data, seconds, insert_per_s=row["insert_per_s"], before=True))
            if not rest:  # what the rule's QUERIES_PER_THREAD rests on: QPS per batch size at 1 thread and at all
                rows[-1]["threads"] = thread_sweep(lambda q: hnsw.search(q, K), data, seconds / 3)
        finally:
            if proc is not None:
                stop(proc)
    return rows


def thread_sweep(search, data: dict, seconds: float) -> list[dict]:
    """QPS of in-process searches per batch size with FAISS on 1 OpenMP thread and on all cores."""
    import faiss
    default = faiss.omp_get_max_threads()
    out = []
    for batch in (1, 4, 16, 32, 64):
        for threads in sorted({1, os.cpu_count() or 1}):
            faiss.omp_set_num_threads(threads)
            out.append({"batch": batch, "threads": threads, **timed(search, data["queries"], batch, seconds)})
    faiss.omp_set_num_threads(default)
    print("  threads:", ", ".join(f"b{r['batch']}/t{r['threads']} {r['qps']:,.0f}" for r in out), flush=True)
    return out


def start_memsvc(data_dir: Path, before: bool):
    """`memsvc serve` on a free port, as shipped now or (before=True) with FAISS threads as before issue 18."""
    import httpx

    from memsvc.client import MemoryClient
    port = free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir)]
    cmd = [sys.executable, "-c", BEFORE_SERVER, *args] if before else [sys.executable, "-m", "memsvc.cli", *args]
    log = data_dir.with_name(f"{data_dir.name}-{'before' if before else 'now'}.log")
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV}, stdout=subprocess.DEVNULL, stderr=out)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:  # it exited: say why instead of waiting out the loop
            raise RuntimeError(f"memsvc exited ({proc.returncode}): {log.read_text()[-600:]}")
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return proc, MemoryClient(url, timeout=600)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"memsvc did not start in 2 minutes: {log.read_text()[-600:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(600)


def measure_memory(system: str, setting: str, mem, data: dict, seconds: float) -> dict:
    """Insert every key into an empty memsvc memory (Memory or RemoteMemory), then measure its searches."""
    rate = insert_rate(lambda s, x: mem.add(x), data["keys"])
    return measure(system, setting, lambda q: mem.search(q, K).ids, data, seconds, insert_per_s=rate)


def run_chroma(server: bool, data: dict, seconds: float) -> list[dict]:
    """Chroma at its default HNSW settings, then at its smallest ef_search reaching TARGET.

    Chroma 1.5.9 stores a modified ef_search but searches an index already loaded with the old one
    (measured: 20K entries, ef 100 -> 32 gave the same recall until the index was loaded again), so every
    change of ef_search is followed by a fresh load: a new server process, or a new embedded client."""
    import chromadb
    from chromadb.api.client import SharedSystemClient
    from chromadb.config import Settings

    name = "chroma-server" if server else "chroma-embedded"
    settings = Settings(anonymized_telemetry=False)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        proc = None

        def connect():
            nonlocal proc
            if not server:
                SharedSystemClient.clear_system_cache()
                return chromadb.PersistentClient(path=tmp, settings=settings)
            if proc is not None:
                proc.terminate()
                proc.wait(60)
            port = free_port()
            proc = subprocess.Popen([str(Path(sys.executable).parent / "chroma"), "run", "--path", tmp,
                                     "--host", "127.0.0.1", "--port", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(600):
                try:
                    client = chromadb.HttpClient(host="127.0.0.1", port=port,
                                                 settings=Settings(anonymized_telemetry=False))
                    client.heartbeat()
                    return client
                except ValueError:  # "Could not connect to a Chroma server": not up yet
                    time.sleep(0.2)
            raise RuntimeError("the Chroma server did not start")

        try:
            col = connect().create_collection("bench", configuration={"hnsw": {"space": "l2"}})
            hnsw = col.configuration.get("hnsw") or {}
            rate = insert_rate(lambda s, x: col.add(ids=[str(i) for i in range(s, s + len(x))], embeddings=x),
                               data["keys"])

            def search(q: np.ndarray) -> np.ndarray:
                res = col.query(query_embeddings=q, n_results=K, include=["distances"])
                return np.array([[int(i) for i in row] for row in res["ids"]], dtype=np.int64)

            def set_ef(ef: int) -> None:
                nonlocal col
                col.modify(configuration={"hnsw": {"ef_search": ef}})
                col = connect().get_collection("bench")
                assert col.configuration["hnsw"]["ef_search"] == ef

            setting = f"hnsw M{hnsw.get('max_neighbors')} ef"
            rows = [measure(name, f"{setting}{hnsw.get('ef_search')} (default)", search, data, seconds,
                            insert_per_s=rate)]
            ef = smallest_ef(set_ef, search, data)
            set_ef(ef)
            rows.append(measure(name, f"{setting}{ef}", search, data, seconds, insert_per_s=rate))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    return rows


def run_pgvector(data: dict, seconds: float) -> list[dict]:
    """pgvector's HNSW index (m 16, ef_construction 64, its defaults) made before the inserts, so every
    insert is indexed as it is in the others; ef_search at its default (40), then the smallest reaching TARGET."""
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,)).fetchone() is None:
            admin.execute(f"CREATE DATABASE {PG_DB}")
    dsn = PG_DSN.replace("dbname=test", f"dbname={PG_DB}")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.commit()
        register_vector(conn)
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({DIM}))")
        conn.execute("CREATE INDEX ON items USING hnsw (embedding vector_l2_ops)")
        conn.commit()

        def add(start: int, x: np.ndarray) -> None:
            with conn.cursor() as cur, cur.copy("COPY items (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "vector"])
                for i, v in enumerate(x, start):
                    copy.write_row((i, v))
            conn.commit()  # acknowledged: durable with the default synchronous_commit

        rate = insert_rate(add, data["keys"])
        conn.autocommit = True
        conn.execute("ANALYZE items")
        one = "SELECT id, embedding <-> %s AS d FROM items ORDER BY embedding <-> %s LIMIT %s"

        def search(q: np.ndarray) -> np.ndarray:
            """One prepared query per vector; a batch goes in one round trip (psycopg's pipeline mode)."""
            with conn.pipeline():
                cursors = [conn.execute(one, (v, v, K), prepare=True) for v in q]
            found = [[r[0] for r in cur.fetchall()] for cur in cursors]
            return np.array([f + [-1] * (K - len(f)) for f in found], dtype=np.int64)

        def set_ef(ef: int) -> None:
            conn.execute(f"SET hnsw.ef_search = {int(ef)}")

        default_ef = int(conn.execute("SHOW hnsw.ef_search").fetchone()[0])
        rows = [measure("pgvector", f"hnsw m16 ef{default_ef} (default)", search, data, seconds,
                        insert_per_s=rate, version=version)]
        ef = smallest_ef(set_ef, search, data)
        set_ef(ef)
        rows.append(measure("pgvector", f"hnsw m16 ef{ef}", search, data, seconds, insert_per_s=rate,
                            version=version))
        conn.execute("DROP TABLE items")
    return rows


# memsvc servers of the benchmarks: ask's model is not loaded in the background (it would take the CPU
# that the searches are timed on)
SERVER_ENV = {"MEMSVC_PRELOAD_MODEL": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- profiling the memsvc server ------------------------------------------------------------------

def profile_server(pid: int, mem, data: dict, seconds: float) -> dict:
    """py-spy samples of the server while one client sends batch-1 searches: all threads that are not idle
    ("busy": running or waiting for a CPU), then only the thread holding the GIL ("gil": Python's own work).
    Per view: the share of samples per place (PLACES), per function on the stack and at its top."""
    spy = shutil.which("py-spy") or str(PEERS_VENV / "bin" / "py-spy")
    out = {}
    for view, flags in (("busy", []), ("gil", ["--gil"])):
        raw = WORK / f"profile-rest-b1-{view}.txt"
        rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                                "--format", "raw", "--output", str(raw), "--nonblocking", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t = timed(lambda q: mem.search(q, K), data["queries"], 1, seconds)
        rec.wait(120)
        inclusive, leaf = shares(raw)
        out[view] = {"batch1": t, "raw": str(raw), "where": where(raw), "inclusive": inclusive, "leaf": leaf}
        print(f"  profile ({view}):", ", ".join(f"{p} {v:.1%}" for p, v in out[view]["where"]), flush=True)
    return out


def shares(raw: Path, top: int = 60) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: the share of samples with each function on the stack (inclusive)
    and at the top of it (leaf), for the top functions; a function is `name (file)`."""
    total, inclusive, leaf = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";") if f]
        if not frames:
            continue
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        leaf[frames[-1]] += n
    if not total:
        return [], []
    return ([(f, n / total) for f, n in inclusive.most_common(top)],
            [(f, n / total) for f, n in leaf.most_common(top)])


# Where a sample's time goes: its innermost frame that matches one of these (function or file names).
PLACES = (
    ("FAISS search", ("replacement_search", "swigfaiss")),
    ("top-k merge, ids -> rows, result", ("_top_k", "_result", "_as_distance", "_rows", "_value_rows")),
    ("npz decode (request)", ("decode_npz", "wire.decode")),
    ("npz encode (response)", ("encode_npz",)),
    ("body -> pydantic model", ("model_validate", "invalid_input")),
    ("metrics, access log, request id", ("observability.py", "prometheus_client", "logging/__init__.py",
                                         "jsonlogger", "json.py")),
    ("HTTP parsing and writing (h11/httptools, uvicorn protocol)", ("h11", "httptools", "protocols/http")),
    ("thread hand-offs (anyio threadpool, run_in_threadpool)", ("to_thread", "run_sync", "WorkerThread",
                                                               "run_in_threadpool", "concurrency.py",
                                                               "Queue.get", "Condition.wait", "Condition.notify",
                                                               "call_soon_threadsafe", "_write_to_self")),
    ("routing, dependencies, middleware (starlette/fastapi)", ("routing.py", "dependencies/utils.py",
                                                              "middleware", "_exception_handler.py",
                                                              "applications.py", "starlette", "fastapi")),
    ("event loop (asyncio)", ("base_events.py", "selector_events.py", "events.py", "selectors.py")),
)


def where(raw: Path) -> list[tuple[str, float]]:
    """Share of the server's busy samples per place (PLACES, innermost match wins; the rest is "other")."""
    total, per = 0, Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += int(count)
        place = next((name for frame in reversed(frames) for name, marks in PLACES
                      if any(m in frame for m in marks)), "other")
        per[place] += int(count)
    return [(p, n / total) for p, n in per.most_common()] if total else []


# --- orchestration (project venv) -----------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    data = load_data()
    if args.system.startswith("memsvc"):
        rows = run_memsvc(args.system == "memsvc-rest", args.ef, data, args.seconds, args.profile)
    elif args.system.startswith("chroma"):
        rows = run_chroma(args.system == "chroma-server", data, args.seconds)
    else:
        rows = run_pgvector(data, args.seconds)
    Path(args.out).write_text(json.dumps(rows))


def run_worker(system: str, python: Path, args: argparse.Namespace, ef: int = 0) -> list[dict] | dict:
    out = WORK / f"worker-{system}.json"
    out.unlink(missing_ok=True)
    cmd = [str(python), __file__, "--worker", system, "--out", str(out), "--seconds", str(args.seconds),
           "--ef", str(ef), "--profile", str(args.profile)]
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONPATH": str(HERE.parent)}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (system, setting): the median of every number over the rounds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["setting"]), []).append(r)
    out = []
    for (system, setting), rs in groups.items():
        row = {"system": system, "setting": setting, "rounds": len(rs)}
        for key in ("insert_per_s", "qps_1", "qps_64", "p50_ms_1", "p99_ms_1", "recall"):
            row[key] = float(np.median([r[key] for r in rs]))
        row["tuned"] = "(default)" not in setting or row["recall"] >= TARGET
        out.append(row)
    return out


def best(rows: list[dict], system: str) -> dict | None:
    """A system's row at its smallest setting reaching TARGET (memsvc: its HNSW rows, not exact flat)."""
    rs = [r for r in rows if r["system"] == system and r["recall"] >= TARGET and "flat" not in r["setting"]
          and "before" not in r["setting"]]
    return min(rs, key=lambda r: int(r["setting"].split("ef")[1].split()[0])) if rs else None


def ratios(rows: list[dict]) -> list[dict]:
    """The issue's targets: memsvc REST >= 2x Chroma server and in-process >= 2x Chroma embedded on insert/s
    and QPS at batch 1 and 64; memsvc REST's p99 at batch 1 <= Chroma server's."""
    out = []
    for ours, theirs in (("memsvc-rest", "chroma-server"), ("memsvc-inproc", "chroma-embedded")):
        a, b = best(rows, ours), best(rows, theirs)
        if a is None or b is None:
            continue
        for key in ("insert_per_s", "qps_1", "qps_64"):
            out.append({"target": f"{ours} {key} >= 2x {theirs}", "ratio": a[key] / b[key],
                        "met": a[key] >= 2 * b[key]})
        if ours == "memsvc-rest":
            out.append({"target": f"{ours} p99_ms_1 <= {theirs}", "ratio": a["p99_ms_1"] / b["p99_ms_1"],
                        "met": a["p99_ms_1"] <= b["p99_ms_1"]})
    return out


def print_table(rows: list[dict], checks: list[dict]) -> None:
    print("\n| system | setting | insert/s | QPS batch 1 | QPS batch 64 | p50 / p99 batch 1 ms | recall@32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['setting']} | {r['insert_per_s']:,.0f} | {r['qps_1']:,.0f} | {r['qps_64']:,.0f}"
              f" | {r['p50_ms_1']:.2f} / {r['p99_ms_1']:.1f} | {r['recall']:.3f} |")
    if checks:
        print("\n| target | ratio | met |\n|---|---:|---|")
        for c in checks:
            print(f"| {c['target']} | {c['ratio']:.2f} | {'yes' if c['met'] else 'no'} |")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("insert_per_s", "insert/s"), ("qps_1", "QPS batch 1"), ("qps_64", "QPS batch 64"),
               ("p99_ms_1", "p99 ms batch 1 (lower is better)")]
    shown = [r for r in rows if r["recall"] >= TARGET]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.35 * len(shown) + 2), sharey=True)
    labels = [f"{r['system']}\n{r['setting']} (R {r['recall']:.3f})" for r in shown]
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(SYSTEMS)}
    for ax, (key, label) in zip(axes, metrics):
        bars = ax.barh(range(len(shown)), [r[key] for r in shown], color=[colors.get(r["system"]) for r in shown])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
    axes[0].set_yticks(range(len(shown)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="per timed measurement")
    ap.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy on the memsvc server (batch 1)")
    ap.add_argument("--tag", default="", help="results go to peers-TAG.{json,png}")
    ap.add_argument("--ef", type=int, default=0,
                    help="memsvc's HNSW ef_search (0: memsvc-inproc finds the smallest reaching 0.97)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only print and plot the rows of these result files together (as peers-TAG)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.system = args.worker
        return worker(args)

    if args.merge:
        return merge(args.merge, args.tag or "merged")
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        sys.exit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    started = {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "uptime": uptime()}
    print(f"start {started}", flush=True)
    prepare_data()
    notes = []
    python = sys.executable
    if any(not s.startswith("memsvc") for s in systems) or args.profile:
        python = peers_python()
    if "pgvector" in systems:
        why = ensure_pgvector()
        if why:
            notes.append(f"pgvector skipped: {why}")
            systems.remove("pgvector")
            print(notes[-1], flush=True)
    ef = args.ef
    if "memsvc-rest" in systems and not ef and "memsvc-inproc" not in systems:
        sys.exit("memsvc-rest needs --ef, or memsvc-inproc in --systems to find it")
    if not ef and "memsvc-inproc" in systems:  # it finds memsvc's ef_search, which memsvc-rest then uses
        systems.remove("memsvc-inproc")
        systems.insert(0, "memsvc-inproc")
    rows: list[dict] = []
    name = "peers" + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(exist_ok=True)

    def save(done: int) -> None:
        """Write what has been measured so far (a cut run keeps it): JSON after every system, PNG per round."""
        table = median_rows(rows)
        finished = {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "uptime": uptime()}
        meta = {"command": " ".join(sys.argv), "started": started, "finished": finished, "rounds_done": done,
                "cores": os.cpu_count(), "n": N, "queries": NQ, "dim": DIM, "k": K, "insert_batch": INSERT_BATCH,
                "memsvc_ef": ef, "notes": notes}
        (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "table": table, "targets": ratios(table),
                                                          "rows": rows}, indent=1))
        if table:
            plot(table, RESULTS / f"{name}.png", f"{N:,} SmolLM2 hidden states (576-d), k={K}, recall@{K} >= "
                 f"{TARGET}; median of {done} round(s); {os.cpu_count()} cores, load {started['uptime']} -> "
                 f"{finished['uptime']}")

    for rnd in range(args.rounds):
        order = systems[rnd % len(systems):] + systems[: rnd % len(systems)]
        print(f"round {rnd + 1}: {', '.join(order)}; load {uptime()}", flush=True)
        for system in order:
            py = sys.executable if system.startswith("memsvc") else python
            try:
                found = run_worker(system, Path(py), args, ef)
            except subprocess.CalledProcessError as exc:
                notes.append(f"round {rnd + 1}: {system} failed ({exc})")
                print(notes[-1], flush=True)
                continue
            for r in found:
                rows.append({**r, "round": rnd + 1})
                if r["system"] == "memsvc-inproc" and not ef and "(default)" not in r["setting"] \
                        and "hnsw" in r["setting"]:
                    ef = int(r["setting"].split("ef")[1].split(",")[0].split()[0])
                    print(f"memsvc hnsw: smallest ef_search reaching recall@{K} {TARGET}: {ef}", flush=True)
            save(rnd)
        save(rnd + 1)
    table = median_rows(rows)
    print_table(table, ratios(table))
    print(f"finished; load {uptime()}")


def merge(paths: list[str], tag: str) -> None:
    """One table and PNG from several runs' rows (e.g. a system re-run after a fix), noting each run's load."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for run in runs for r in run["rows"]]
    table = median_rows(rows)
    print_table(table, ratios(table))
    loads = "; ".join(f"{Path(p).stem} {run['started']['utc']} load {run['started']['uptime']}"
                      for p, run in zip(paths, runs))
    (RESULTS / f"peers-{tag}.json").write_text(json.dumps({"merged": paths, "loads": loads, "table": table,
                                                           "targets": ratios(table)}, indent=1))
    plot(table, RESULTS / f"peers-{tag}.png", f"{N:,} SmolLM2 hidden states (576-d), k={K}, rows with recall@{K}"
         f" >= {TARGET}; {os.cpu_count()} cores; {loads}")


def uptime() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
