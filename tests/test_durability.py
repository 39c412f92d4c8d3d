"""Faults against a real server: SIGKILL in the middle of add streams, a disk that fills up, and memories
whose files are damaged."""
from __future__ import annotations

import random
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import ServerProcess

from memsvc.api.errors import http_status
from memsvc.client import MemoryClient
from memsvc.contract import MemoryUnavailable, MemsvcError, StorageFull

DIM = 16


def entries_of(batch: int, n: int) -> tuple[np.ndarray, np.ndarray, list]:
    """A batch whose every entry carries its batch number in key, value and payload."""
    return np.full((n, DIM), batch, np.float32), np.full(n, batch), [{"batch": batch}] * n


@pytest.fixture
def servers():
    """Servers a test starts; killed afterwards even if the test fails."""
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.kill()


def test_sigkill_server_during_adds_keeps_every_acknowledged_entry(tmp_path, servers):
    srv = ServerProcess(tmp_path / "data")
    servers.append(srv.start())
    client = MemoryClient(srv.url)
    client.create_memory("stream", dim=DIM, value_kind="token")
    acked: dict[int, np.ndarray] = {}  # batch -> ids the server acknowledged
    stop = threading.Event()

    def writer(first_batch: int) -> None:
        mem = MemoryClient(srv.url).memory("stream")
        batch = first_batch
        while not stop.is_set():
            keys, values, payloads = entries_of(batch, random.randint(1, 40))
            try:
                acked[batch] = mem.add(keys, values=values, payloads=payloads, partition=f"w{first_batch}")
            except Exception:  # noqa: BLE001 - any error: the server died under us, this batch was not acknowledged
                return
            batch += 4

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started = time.monotonic()
    while len(acked) < 20 and time.monotonic() - started < 60:  # the first adds: slower on a loaded machine
        time.sleep(0.05)
    time.sleep(random.uniform(1.5, 3.0))
    srv.kill()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) > 20, "the writers did not get going"

    srv.start()
    mem = MemoryClient(srv.url).memory("stream")
    for batch, ids in acked.items():
        got = mem.get(ids)
        assert got.found.all(), f"acknowledged batch {batch} lost entries"
        assert (got.values == batch).all() and (got.keys == batch).all()
    # nothing half-written: every stored entry belongs to a whole batch
    total = mem.stats().count
    everything = mem.get(np.arange(max(int(ids.max()) for ids in acked.values()) + 200))
    stored = everything.values[everything.found]
    assert len(stored) == total
    np.testing.assert_array_equal(everything.keys[everything.found][:, 0], stored.astype(np.float32))
    assert [p["batch"] for p, f in zip(everything.payloads, everything.found) if f] == stored.tolist()
    for batch, count in zip(*np.unique(stored, return_counts=True)):
        if batch in acked:
            assert count == len(acked[batch])
    assert len(set(stored.tolist()) - set(acked)) <= 4  # at most one in-flight batch per writer, whole


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root with mount rights, as on our machines and CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clean_507_and_recovers(small_disk, tmp_path, servers):
    srv = ServerProcess(small_disk / "data", env={"MEMSVC_DATABASE_URL": f"sqlite:///{tmp_path}/catalog.db"})
    srv.log = tmp_path / "server.log"
    servers.append(srv.start())
    mem = MemoryClient(srv.url).create_memory("fill", dim=DIM, value_kind="token")
    acked, batch, failure = [], 0, None
    while failure is None and batch < 10_000:
        keys, values, payloads = entries_of(batch, 200)
        try:
            acked.append(mem.add(keys, values=values, payloads=payloads))
        except MemsvcError as exc:
            failure = exc
        batch += 1
    assert isinstance(failure, StorageFull) and http_status(failure) == 507
    assert mem.stats().count == 200 * len(acked)  # the failed add left nothing behind
    assert mem.search(np.zeros((1, DIM), np.float32), k=1).ids[0, 0] == 0  # still serving

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space returns
    more = mem.add(*entries_of(batch, 200)[:1], values=entries_of(batch, 200)[1])
    assert more[0] == acked[-1][-1] + 1
    srv.kill()
    srv.start()  # and a restart finds every acknowledged entry
    mem = MemoryClient(srv.url).memory("fill")
    assert mem.stats().count == 200 * (len(acked) + 1)
    assert mem.get(np.concatenate(acked + [more])).found.all()


def damage(path, at: int = -4) -> None:
    """Flip 4 bytes of a file (from its end when `at` is negative)."""
    data = bytearray(path.read_bytes())
    data[at:at + 4 or None] = bytes(b ^ 0xFF for b in data[at:at + 4 or None])
    path.write_bytes(bytes(data))


def test_a_memory_that_cannot_be_opened_is_a_503_naming_it_and_the_others_keep_serving(tmp_path, servers):
    srv = ServerProcess(tmp_path / "data")
    servers.append(srv.start())
    client = MemoryClient(srv.url)
    keys = np.random.default_rng(0).standard_normal((300, DIM)).astype(np.float32)
    kinds = {"good": {}, "bad-index": {"index": "hnsw"}, "bad-keys": {}, "bad-state": {}, "bad-log": {},
             "bad-spec": {}}
    for name, spec in kinds.items():
        client.create_memory(name, dim=DIM, **spec).add(keys)
    srv.stop()  # snapshots every memory
    memories = srv.data_dir / "memories"
    damage(next((memories / "bad-index").glob("snapshot-*")) / "index-0.faiss", at=200)  # faiss never reads it
    damage(next((memories / "bad-keys").glob("snapshot-*")) / "keys.npy")
    (next((memories / "bad-state").glob("snapshot-*")) / "state.json").write_text('{"next_id": 3')
    (memories / "bad-spec" / "spec.json").write_text("{}")
    srv.start()
    client = MemoryClient(srv.url)
    client.memory("bad-log").delete(ids=[0])  # into segment 2, after the snapshot
    srv.kill()
    (memories / "bad-log" / "wal-00000003.log").write_bytes(b"")  # segment 3 began: 2 is not the tail
    damage(memories / "bad-log" / "wal-00000002.log", at=20)
    srv.start()

    client = MemoryClient(srv.url)
    http = httpx.Client(base_url=srv.url)
    for name in kinds:
        if name == "good":
            continue
        for r in (http.get(f"/v1/memories/{name}"),
                  http.post(f"/v1/memories/{name}/search", json={"queries": keys[:1].tolist(), "k": 1})):
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "memory_unavailable" and err["field"] == "name"
            assert f"memory '{name}' is unavailable" in err["message"]
        with pytest.raises(MemoryUnavailable):
            client.memory(name).search(keys[:1], k=1)
    assert http.get("/v1/health").status_code == 200
    good = client.memory("good")
    assert good.search(keys[[7, 299]], k=1).ids.ravel().tolist() == [7, 299]
    assert good.add(keys[:1])[0] == 300
    assert sorted(m.name for m in client.list_memories()) == sorted(kinds)
    assert srv.proc.poll() is None  # still the same process

    client.delete_memory("bad-keys")  # a damaged memory can be deleted, and its name used again
    fresh = client.create_memory("bad-keys", dim=DIM)
    assert fresh.add(keys[:2]).tolist() == [0, 1]
