"""Fixtures: real Redis deployments, real images from ../shared/data, a real extractor.

The standalone server, the 3-master cluster and their TLS twins (with a password and a
self-signed certificate made by ``openssl``) use Debian's ``redis-server`` (``make test`` installs it);
they listen on loopback only and are stopped at the end of the session. Without the binary the
tests that need them are skipped locally and fail under CI.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cbir.store.database import VectorStore
from cbir.store.redis.connect import connect

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
            # Not retried by the client: an AuthenticationError is a ConnectionError to redis-py,
            # and its default retries held each start of a server with a password for 3-5 s.
            redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), **client).ping()
            return
        except redis.AuthenticationError:
            return  # up, and asking for a password
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


def _tls_options(certificate: Path | None) -> dict:
    """redis-py options that trust ``certificate``; none without one."""
    return {} if certificate is None else {"ssl": True, "ssl_ca_certs": str(certificate)}


def _start_server(binary: str, port: int, directory: Path, *extra: str,
                  certificate: Path | None = None) -> subprocess.Popen:
    """redis-server on ``port``; with a ``certificate`` (and its key beside it), TLS only."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)]
    if certificate is not None:
        # The certificate is its own authority, which a cluster's nodes need to trust each other.
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificate),
                  "--tls-key-file", str(certificate.with_suffix(".key")), "--tls-ca-cert-file", str(certificate),
                  "--tls-auth-clients", "no"]
    process = subprocess.Popen(
        [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ping(port, **_tls_options(certificate))
    except RuntimeError:
        _stop([process])
        raise
    return process


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _restart_later(binary: str, port: int, directory: Path, *options: str,
                   after: float = 0.5) -> tuple[threading.Thread, list[subprocess.Popen]]:
    """Starts redis-server on ``port`` again after ``after`` seconds, in a thread (join it); its
    process lands in the list."""
    started: list[subprocess.Popen] = []

    def restart() -> None:
        time.sleep(after)
        started.append(_start_server(binary, port, directory, *options))
    thread = threading.Thread(target=restart)
    thread.start()
    return thread, started


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """Debian's redis-server (skipped without it locally, failed under CI)."""
    return _need(_redis_binary("redis-server"), "redis-server")


@pytest.fixture(scope="session")
def standalone_url(tmp_path_factory, redis_server_binary):
    port = _free_port()
    process = _start_server(redis_server_binary, port, tmp_path_factory.mktemp("standalone"))
    yield f"redis://127.0.0.1:{port}/0"
    _stop([process])


def _start_cluster(binary: str, root: Path, processes: list[subprocess.Popen], certificate: Path | None = None,
                   password: str | None = None, replicas: int = 0, node_timeout_ms: int = 5000) -> list[int]:
    """Ports of a 3-master cluster on loopback (``replicas`` replicas of each, in sync), in state ok;
    its servers are added to ``processes`` as they start, so the caller stops them even if the
    cluster fails to form."""
    cli = _need(_redis_binary("redis-cli"), "redis-cli")
    node_options = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)]
    cli_options = []
    if certificate is not None:
        node_options += ["--tls-cluster", "yes"]
        cli_options += ["--tls", "--cacert", str(certificate)]
    if password is not None:
        node_options += ["--requirepass", password, "--masterauth", password]
        cli_options += ["-a", password, "--no-auth-warning"]
    ports = []
    for _ in range(3 * (1 + replicas)):
        port = _free_port(also_bus=True)
        ports.append(port)
        processes.append(_start_server(binary, port, root / str(port), *node_options, "--cluster-config-file",
                                       f"nodes-{port}.conf", certificate=certificate))
    subprocess.run([cli, *cli_options, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", str(replicas), "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
    # Every node, not the first alone: each learns the others' slots by gossip, and a command sent to
    # one that has not yet was answered "CLUSTERDOWN The cluster is down" (a flaky first test).
    nodes = [redis.Redis(host="127.0.0.1", port=port, password=password, **_tls_options(certificate))
             for port in ports]
    deadline = time.time() + 30
    while any(node.cluster("info").get("cluster_state") != "ok" for node in nodes) or any(
            node.info("replication").get("master_link_status", "up") != "up" for node in nodes):
        if time.time() > deadline:
            raise RuntimeError("the test cluster did not reach state ok (its replicas in sync) on every node")
        time.sleep(0.2)
    return ports


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory, redis_server_binary):
    processes = []
    try:
        ports = _start_cluster(redis_server_binary, tmp_path_factory.mktemp("cluster"), processes)
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        _stop(processes)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> Path:
    """A self-signed certificate for 127.0.0.1 (key beside it, ``.key``): its own authority."""
    openssl = _need(shutil.which("openssl"), "openssl")
    certificate = tmp_path_factory.mktemp("tls") / "redis.crt"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(certificate.with_suffix(".key")), "-out", str(certificate),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return certificate


TLS_PASSWORD = "s3cret tls"


def _tls_url(port: int, certificate: Path) -> str:
    """rediss:// with the password and the certificate to trust, as a user would write it."""
    return f"rediss://:{quote(TLS_PASSWORD)}@127.0.0.1:{port}/0?ssl_ca_certs={quote(str(certificate))}"


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory, redis_server_binary, certificate):
    """The port of a redis-server speaking only TLS and asking for TLS_PASSWORD."""
    port = _free_port()
    process = _start_server(redis_server_binary, port, tmp_path_factory.mktemp("tls_server"),
                            "--requirepass", TLS_PASSWORD, certificate=certificate)
    yield port
    _stop([process])


@pytest.fixture(scope="session")
def tls_url(tls_server, certificate):
    return _tls_url(tls_server, certificate)


@pytest.fixture(scope="session")
def tls_cluster_url(tmp_path_factory, redis_server_binary, certificate):
    """A 3-master cluster speaking only TLS (clients and bus) and asking for TLS_PASSWORD."""
    processes = []
    try:
        ports = _start_cluster(redis_server_binary, tmp_path_factory.mktemp("tls_cluster"), processes, certificate,
                               TLS_PASSWORD)
        yield _tls_url(ports[0], certificate)
    finally:
        _stop(processes)


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cbir_home")


@pytest.fixture(scope="session")
def embedded_client(embedded_home):
    client = connect(home=embedded_home)
    yield client


DEPLOYMENTS = ["embedded", "standalone", "cluster"]
# TLS (with a password) changes only the transport: the tests of the wire (command streams, a
# round trip) take it too, on a server and a cluster; the rest would only repeat those deployments.
WITH_TLS = [*DEPLOYMENTS, "tls", "tls_cluster"]


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
    from cbir.models.factory import create_extractor

    return create_extractor("efficientnet_lite0", input_size=TEST_INPUT_SIZE, device="cpu")


@pytest.fixture(scope="session")
def busi():
    if not BUSI.is_dir():
        pytest.fail(f"{BUSI} is missing: the tests need ../shared/data beside the project")
    return BUSI


# ------------------------------------------------------------------ fault table
# The fault tests say what they did and what came of it; the rows become docs/RELIABILITY.md's
# table (`make fault-table` writes it there; every run of the suite writes results/fault_table.md).
FAULT_TABLE = ROOT / "results" / "fault_table.md"
_FAULT_ROWS: list[tuple[str, str, str, str, str]] = []
_FAULT_HEADER = ("fault or bad input", "images expected", "stored after the run (and a re-run)", "exactly once",
                 "what the user was told")


def record_fault(fault: str, expected: int | str, stored: int | str, once: bool | str, told: str) -> None:
    """One row of the fault table: reached only once the test's assertions have held."""
    if isinstance(once, bool):
        once = "yes" if once else "NO"
    told = re.sub(r"test-[0-9a-f]{10}", "<db>", " ".join(told.split())).replace("|", "\\|")
    # What the user read, quoted; a note in parentheses where the run said nothing about the fault.
    shown = told if told.startswith("(") else f"`{told}`" if told else "(nothing: killed)"
    _FAULT_ROWS.append((fault, str(expected), str(stored), once, shown))


def pytest_sessionfinish(session, exitstatus):
    if not _FAULT_ROWS:
        return
    rows = sorted(set(_FAULT_ROWS))
    lines = ["| " + " | ".join(_FAULT_HEADER) + " |", "|" + "---|" * len(_FAULT_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    FAULT_TABLE.parent.mkdir(exist_ok=True)
    FAULT_TABLE.write_text(text, encoding="utf-8")
    target = os.environ.get("CBIR_FAULT_TABLE_DOC")
    if target:  # `make fault-table`: the table between its markers in the document
        doc = Path(target)
        begin, end = "<!-- fault table: begin -->\n", "<!-- fault table: end -->"
        before, _, rest = doc.read_text(encoding="utf-8").partition(begin)
        doc.write_text(before + begin + text + end + rest.partition(end)[2], encoding="utf-8")
