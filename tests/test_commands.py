"""Command batches: the hand-packed protocol matches redis-py's, and runs on every real deployment."""
from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer

from cbir.commands import CommandStream, _packed

from .conftest import WITH_TLS


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
