"""Fixtures: real Redis deployments, real images from ../shared/data, a real extractor.

The standalone server, the 3-master cluster and the TLS server (password too, self-signed
certificate made with ``openssl``) use Debian's ``redis-server`` (``make test`` installs it);
they listen on loopback only and are stopped at the end of the session. Without the binary the
tests that need them are skipped locally and fail under CI.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from cbir.connection import connect
from cbir.store import VectorStore

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BUSI = SHARED_DATA / "busi"
BREASTMNIST = SHARED_DATA / "breastmnist.npz"
TEST_INPUT_SIZE = 64  # small inputs keep the real pretrained model fast in tests


def _redis_binary(name: str) -> str | None:
    for candidate in (f"/usr/bin/{name}", f"/usr/local/bin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def _need(binary: str | None, what: str) -> str:
    if binary:
        return binary
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI: .ci/run must install redis-server")
    pytest.skip(f"{what} is not installed (apt-get install redis-server)")


def _free_port(also_bus: bool = False) -> int:
    """A free loopback port; for a cluster node, one whose bus port (+10000) is free too."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not also_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free loopback port")


def _wait_ping(port: int, timeout: float = 10.0, **client) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            redis.Redis(host="127.0.0.1", port=port, **client).ping()
            return
        except redis.AuthenticationError:
            return  # up, and asking for a password
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


def _start_server(binary: str, port: int, directory: Path, *extra: str,
                  certificate: Path | None = None) -> subprocess.Popen:
    """redis-server on ``port``; with a ``certificate`` (and its key beside it), TLS only."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)]
    if certificate is not None:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificate),
                  "--tls-key-file", str(certificate.with_suffix(".key")), "--tls-auth-clients", "no"]
    process = subprocess.Popen(
        [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ping(port, **({} if certificate is None else {"ssl": True, "ssl_ca_certs": str(certificate)}))
    return process


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def standalone_url(tmp_path_factory):
    binary = _need(_redis_binary("redis-server"), "redis-server")
    port = _free_port()
    process = _start_server(binary, port, tmp_path_factory.mktemp("standalone"))
    yield f"redis://127.0.0.1:{port}/0"
    _stop([process])


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory):
    binary = _need(_redis_binary("redis-server"), "redis-server")
    cli = _need(_redis_binary("redis-cli"), "redis-cli")
    root = tmp_path_factory.mktemp("cluster")
    ports, processes = [], []
    try:
        for _ in range(3):
            port = _free_port(also_bus=True)
            ports.append(port)
            processes.append(_start_server(binary, port, root / str(port), "--cluster-enabled", "yes",
                                           "--cluster-config-file", f"nodes-{port}.conf",
                                           "--cluster-node-timeout", "5000"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
        deadline = time.time() + 30
        while redis.Redis(port=ports[0]).cluster("info").get("cluster_state") != "ok":
            if time.time() > deadline:
                raise RuntimeError("the test cluster did not reach state ok")
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        _stop(processes)


def self_signed_certificate(directory: Path) -> Path:
    """A certificate for 127.0.0.1 (key beside it, ``.key``), its own certificate authority."""
    openssl = _need(shutil.which("openssl"), "openssl")
    certificate = directory / "redis.crt"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(certificate.with_suffix(".key")), "-out", str(certificate),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return certificate


TLS_PASSWORD = "s3cret tls"


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory):
    """(port, certificate) of a redis-server speaking only TLS and asking for TLS_PASSWORD."""
    binary = _need(_redis_binary("redis-server"), "redis-server")
    root = tmp_path_factory.mktemp("tls")
    certificate = self_signed_certificate(root)
    port = _free_port()
    process = _start_server(binary, port, root / "data", "--requirepass", TLS_PASSWORD, certificate=certificate)
    yield port, certificate
    _stop([process])


@pytest.fixture(scope="session")
def tls_url(tls_server):
    """rediss:// with the password and the certificate to trust, as a user would write it."""
    port, certificate = tls_server
    return f"rediss://:{quote(TLS_PASSWORD)}@127.0.0.1:{port}/0?ssl_ca_certs={quote(str(certificate))}"


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cbir_home")


@pytest.fixture(scope="session")
def embedded_client(embedded_home):
    client = connect(home=embedded_home)
    yield client


DEPLOYMENTS = ["embedded", "standalone", "cluster"]
# TLS changes only the transport of a standalone server: the tests of the wire (command streams,
# a round trip, an add and its queries) take it too, the rest would only repeat "standalone".
WITH_TLS = [*DEPLOYMENTS, "tls"]


@pytest.fixture(params=DEPLOYMENTS)
def deployment(request):
    """(name, client, url) of each real Redis deployment; url is None for the embedded one."""
    if request.param == "embedded":
        return "embedded", request.getfixturevalue("embedded_client"), None
    url = request.getfixturevalue(f"{request.param}_url")
    return request.param, connect(url), url


@pytest.fixture
def db_name():
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(deployment, db_name):
    """An empty database on each deployment, dropped afterwards."""
    _, client, _ = deployment
    store = VectorStore(client, db_name)
    yield store
    VectorStore(client, db_name).drop()


@pytest.fixture
def cli_env(request, monkeypatch):
    """Commands run without --redis-url reach the standalone test server, or the server named
    by an indirect parameter ("tls")."""
    url = request.getfixturevalue(f"{getattr(request, 'param', 'standalone')}_url")
    monkeypatch.setenv("CBIR_REDIS_URL", url)
    return url


@pytest.fixture(scope="session")
def extractor():
    from cbir.models import create_extractor

    return create_extractor("efficientnet_lite0", input_size=TEST_INPUT_SIZE, device="cpu")


@pytest.fixture(scope="session")
def busi():
    if not BUSI.is_dir():
        pytest.fail(f"{BUSI} is missing: the tests need ../shared/data beside the project")
    return BUSI
