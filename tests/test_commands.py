"""Command batches: the hand-packed protocol matches redis-py's, and runs on every real deployment."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer

from cbir.errors import ConnectionResumedWarning, StoreError
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord
from cbir.store.redis.commands import CommandStream, _packed
from cbir.store.redis.connect import connect
from cbir.store.writer import WriteStream

from .conftest import WITH_TLS, _free_port, _restart_later, _start_server, _stop


def _redis_py_packing(*args) -> bytes:
    serializer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    return b"".join(serializer.pack(*args))


def test_commands_pack_as_redis_py_does_with_large_arguments_uncopied():
    vector_chunk = b"\0" * 100_000
    commands = [("SET", "v:0", vector_chunk), ("HINCRBY", "info", "version", 1),
                ("APPEND", "names:\u00e9", "dir/img (1) \u00e9.png"), ("SET", "long", b"x" * 5000)]
    buffers = _packed(commands)
    assert any(buffer is vector_chunk for buffer in buffers)
    assert b"".join(buffers) == b"".join(_redis_py_packing(*c) for c in commands)


@pytest.mark.parametrize("deployment", WITH_TLS, indirect=True)
def test_stream_keeps_the_order_of_phases_and_reports_each_batch_once(deployment, db_name):
    _, client, _ = deployment
    done = []
    stream = CommandStream(client, depth=1, done=done.append)
    for batch in range(5):
        stream.send([[("SET", f"{db_name}:{batch}", b"%d" % batch)], [("APPEND", f"{db_name}:log", b"%d" % batch)]],
                    token=batch)
    stream.close()
    assert done == [0, 1, 2, 3, 4]
    assert client.get(f"{db_name}:log") == b"01234"
    client.delete(f"{db_name}:log", *[f"{db_name}:{b}" for b in range(5)])


@pytest.mark.parametrize("deployment", WITH_TLS, indirect=True)
def test_stream_error_raises_and_settles_every_batch_in_flight(deployment, db_name):
    _, client, _ = deployment
    client.set(f"{db_name}:s", b"text")
    done = []
    stream = CommandStream(client, depth=8, done=done.append)
    with pytest.raises(redis.ResponseError):  # at close on one server; at once on a cluster
        stream.send([[("INCR", f"{db_name}:s")]], token="bad")
        stream.send([[("SET", f"{db_name}:t", b"1")]], token="good")
        stream.close()
    assert done == (["bad"] if isinstance(client, RedisCluster) else ["bad", "good"])
    assert client.get(f"{db_name}:s") == b"text"  # and the client is still usable
    client.delete(f"{db_name}:s", f"{db_name}:t")


def test_a_stream_rides_out_a_server_restart_and_sends_its_batches_in_flight_again(redis_server_binary, tmp_path):
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    port = _free_port()
    servers = [_start_server(redis_server_binary, port, tmp_path, *durable)]
    try:
        client = connect(f"redis://127.0.0.1:{port}/0")
        done, checks = [], []
        stream = CommandStream(client, depth=4, done=done.append, resumed=lambda: checks.append(client.ping()))
        for batch in range(10):
            if batch == 5:  # with batches in flight: some stored, some sent into the closing socket
                _stop(servers)
                restarter, servers = _restart_later(redis_server_binary, port, tmp_path, *durable)
            stream.send([[("SET", f"k:{batch}", b"%d" % batch)], [("RPUSH", "log", b"%d" % batch)]], token=batch)
        stream.close()
        restarter.join()
        assert stream.resumptions == 1 and checks == [True] and not stream.failed
        assert done == list(range(10))
        assert [client.get(f"k:{batch}") for batch in range(10)] == [b"%d" % batch for batch in range(10)]
        assert set(client.lrange("log", 0, -1)) == {b"%d" % batch for batch in range(10)}
    finally:
        _stop(servers)


def test_a_writer_whose_server_came_back_empty_stops_with_one_error(redis_server_binary, tmp_path):
    """A restart without persistence lost the database and the writer's lock: writing on would
    leave chunks without the info that says what they are."""
    port = _free_port()
    servers = [_start_server(redis_server_binary, port, tmp_path)]
    try:
        store = VectorStore(connect(f"redis://127.0.0.1:{port}/0"), "lost")
        store.ensure_model("fp", {}, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConnectionResumedWarning)
            with store.writing():
                stream = WriteStream(store, depth=0)  # each write waits for its replies
                stream.write(store.prepare([ImageRecord(name="a", label="x")]), np.ones((1, 2), np.float32))
                _stop(servers)
                restarter, servers = _restart_later(redis_server_binary, port, tmp_path)
                with pytest.raises(StoreError, match="no longer holds this run's writer lock"):
                    # The lock, renewed before each plan, went with the server's data: nothing more is planned.
                    plan = store.prepare([ImageRecord(name="b", label="x")])
                    stream.write(plan, np.ones((1, 2), np.float32))
                    stream.close()
                restarter.join()
        assert store.client.keys("cbir:lost:vec:*") == [] and store.client.keys("cbir:lost:meta:*") == []
    finally:
        _stop(servers)
