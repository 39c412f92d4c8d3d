"""A real Milvus standalone server for the tests: PyPI package `milvus` (2.3.5), which bundles the
Milvus binary with an embedded etcd and local storage (no Docker).

The package lives in its own virtualenv (`make test` makes `.venv-milvus`; `MEMSVC_TEST_MILVUS_VENV`
names another). Its Python writes the server's config and unpacks the binary into the data dir once;
the binary is then run directly, so that a test can SIGKILL it and start it again on the same data dir
and ports. Every port is a free one, the embedded etcd's too (its defaults, 2379/2380, would clash with
any other Milvus on the machine), and the server dies with the process that started it (PR_SET_PDEATHSIG,
through util-linux' setpriv) should that process die before stopping it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import ServerProcess, free_port

VENV = Path(os.environ.get("MEMSVC_TEST_MILVUS_VENV", Path(__file__).resolve().parent.parent / ".venv-milvus"))
UNPACKED: list[Path] = []  # the bin/ of a prepared data dir: later data dirs link to its files
PORTS = ["etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
         "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port"]
# Settings of milvus.yaml for a test server ("section.key": value). Collections use Strong consistency, so
# every search, query and count waits until the query node has seen a time tick past the request; the ticks
# come every proxy.timeTickInterval ms (200 by default, about 0.2-0.4 s per read): at 20 ms a read takes
# about 40 ms, which makes the real server's share of the suite several times shorter.
SETTINGS = {"proxy.timeTickInterval": 20}
PREPARE = """
import json, sys
from milvus import MilvusServerConfig, _initialize_data_files
config = MilvusServerConfig(data_dir=sys.argv[1], **json.loads(sys.argv[2]))
for key, value in json.loads(sys.argv[3]).items():
    config.set(key, value)
config.resolve()
_initialize_data_files(config.base_data_dir)
"""


def available() -> str | None:
    """Why no real Milvus server can run here, or None when one can."""
    if not (VENV / "bin" / "python").exists():
        return f"no Milvus server package: {VENV} is missing (`make test` creates it)"
    return None


class MilvusServer(ServerProcess):
    """`milvus run standalone` on `data_dir`; restartable on the same ports after `kill()` (SIGKILL: what
    Milvus had persisted is all a restart gets) or `stop()` (SIGTERM, then SIGKILL after the timeout)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.proc: subprocess.Popen | None = None
        ports_file = self.data_dir / "memsvc-ports.json"
        if ports_file.exists():
            self.ports = json.loads(ports_file.read_text())
        else:
            self.ports = {name: free_port() for name in [*PORTS, "etcd_peer_port", "metrics_port"]}
            self._prepare()
            ports_file.write_text(json.dumps(self.ports))
        self.uri = f"http://127.0.0.1:{self.ports['proxy_port']}"

    def _prepare(self) -> None:
        """Write the config (our ports, paths in data_dir) and unpack the binary, with the package's own code."""
        (self.data_dir / "bin").mkdir(parents=True, exist_ok=True)
        for unpacked in UNPACKED[:1]:  # the package skips files whose checksum file matches: no unpacking again
            for file in unpacked.iterdir():
                os.link(file, self.data_dir / "bin" / file.name)
        config = {name: self.ports[name] for name in PORTS}
        subprocess.run([str(VENV / "bin" / "python"), "-c", PREPARE, str(self.data_dir), json.dumps(config),
                        json.dumps(SETTINGS)],
                       check=True, capture_output=True, timeout=300)
        UNPACKED.append(self.data_dir / "bin")
        client, peer = f"http://127.0.0.1:{self.ports['etcd_port']}", f"http://127.0.0.1:{self.ports['etcd_peer_port']}"
        (self.data_dir / "embedEtcd.yaml").write_text(
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n")

    def start(self, timeout: float = 180.0) -> MilvusServer:
        """Start the server and return once its health check answers (or fail with its log)."""
        binary = self.data_dir / "bin" / "milvus"
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.ports["metrics_port"]),
               "MILVUS_RUN_DIR": str(self.data_dir / "run"), "LD_LIBRARY_PATH": str(binary.parent),
               "ETCD_CONFIG_PATH": str(self.data_dir / "embedEtcd.yaml")}
        self.log = self.data_dir / "logs" / "memsvc-test-server.log"
        # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs the server; a preexec_fn would run Python in
        # the forked child of a process whose gRPC threads (pymilvus) abort there
        command = [str(binary), "run", "standalone"]
        if shutil.which("setpriv"):
            command = ["setpriv", "--pdeathsig", "KILL", *command]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self.wait_healthy(f"http://127.0.0.1:{self.ports['metrics_port']}/healthz", timeout)
