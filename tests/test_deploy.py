"""No Docker engine runs here, so the deployment files are checked for structure instead."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_volumes_and_healthchecks():
    c = compose()
    services = c["services"]
    assert {"memsvc", "postgres", "memsvc-gpu"} <= services.keys()
    for name in ("memsvc", "memsvc-gpu", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    url = services["memsvc"]["environment"]["MEMSVC_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url  # the compose service
    pg = services["postgres"]["environment"]
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}" in url
    assert services["memsvc"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    named = set(c["volumes"])
    for name in ("memsvc", "postgres", "milvus", "etcd", "minio"):
        for volume in services[name]["volumes"]:
            assert volume.split(":")[0] in named, f"{name} mounts {volume}, not a named volume"


def test_gpu_profile_reserves_a_gpu_and_installs_the_gpu_extra():
    gpu = compose()["services"]["memsvc-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["EXTRAS"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "memsvc-gpu" not in compose()["services"]["memsvc"].get("profiles", [])


def test_scale_profile_runs_memsvc_on_milvus():
    services = compose()["services"]
    scale = services["memsvc-scale"]
    assert scale["environment"]["MEMSVC_VECTOR_BACKEND"] == "milvus"
    assert scale["environment"]["MEMSVC_MILVUS_URI"].startswith("http://milvus:")
    assert scale["build"]["args"]["EXTRAS"] == "milvus"
    assert {"postgres", "milvus"} <= set(scale["depends_on"])
    for name in ("memsvc-scale", "milvus", "etcd", "minio"):
        assert services[name]["profiles"] == ["scale"] and services[name]["healthcheck"]["test"], name
    assert {"etcd", "minio"} <= set(services["milvus"]["depends_on"])


def test_dockerfile_installs_with_make_install():
    """The image runs the developers' install command, so the two cannot drift apart."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = re.findall(r"^RUN (.*)$", dockerfile, re.MULTILINE)
    assert any(r.startswith("make install ") for r in runs)
    copied = re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE)
    # every file the install recipe reads is copied into the image
    recipe = subprocess.run(["make", "-n", "-B", "install", "VENV=/opt/venv", "EXTRAS=gpu"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "pip install" in recipe and "faiss-gpu-cu12" in recipe
    for needed in ("pyproject.toml", "memsvc", "lm", "retrievers"):
        assert needed in copied
    assert dockerfile.rstrip().splitlines()[-1].startswith("CMD")
    assert '"serve"' in dockerfile and "0.0.0.0" in dockerfile
