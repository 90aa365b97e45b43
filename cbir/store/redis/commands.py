"""Batches of Redis commands, run on any deployment as fast as the client allows.

A batch is a list of commands, each an argument tuple. On a single server a batch goes out on
one connection as a few buffers, large values (vector chunks) sent as they are, where redis-py
with hiredis copies them into its packed command first. On a Redis Cluster a batch is one
pipeline per node, and work that a lost node interrupts is run again once the cluster has
failed the node over (:func:`through_failover`).
"""
from __future__ import annotations

import socket
import time
from collections import deque
from typing import Callable, Sequence

from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_ARGUMENT_HEADERS = [b"$%d\r\n" % n for n in range(4096)]  # "$<length>\r\n" of short arguments
SEND_BUFFER_BYTES = 16 << 20
_LARGE = 64 * 1024  # arguments from this size on go out as their own buffer, uncopied
# How often a stream reconnects and sends its batches in flight again after losing its server;
# each reconnection rides out the client's own retries (a restart of several seconds).
RESUMPTIONS = 3


def _header(length: int) -> bytes:
    return _ARGUMENT_HEADERS[length] if length < len(_ARGUMENT_HEADERS) else b"$%d\r\n" % length


def _as_bytes(argument) -> bytes:
    if isinstance(argument, (bytes, memoryview)):
        return argument
    if isinstance(argument, str):
        return argument.encode("utf-8")
    return b"%d" % argument


Command = tuple  # (name, *arguments): str, bytes, memoryview or int arguments


def _packed(commands: Sequence[Command]) -> list[bytes]:
    """The commands in the Redis protocol (RESP), as few buffers, large arguments uncopied."""
    buffers: list[bytes] = []
    small: list[bytes] = []
    for command in commands:
        small.append(b"*%d\r\n" % len(command))
        for argument in map(_as_bytes, command):
            small.append(_header(len(argument)))
            if len(argument) >= _LARGE:
                buffers += (b"".join(small), argument)
                small = [b"\r\n"]
            else:
                small += (argument, b"\r\n")
    return buffers + [b"".join(small)]


# How long work waits for a Redis Cluster to replace a lost primary by its replica: the cluster
# needs cluster-node-timeout (15 s by default) to find the primary failed, then an election.
FAILOVER_SECONDS = 30.0
# What a Cluster answers while a node is lost or its slots move: worth a retry once the client
# has read the cluster's slots again.
_WHILE_FAILING_OVER = (RedisConnectionError, ClusterDownError, SlotNotCoveredError, TryAgainError, MovedError,
                       AskError)


def run(client, commands: Sequence[Command]) -> list:
    """The replies of ``commands``, in order, the first error raised as Redis worded it (not as
    redis-py's pipeline does, after the whole failing command, binary vectors and all): one
    pipeline on a single server, one per node on a Cluster (each command routed by its key: its first
    argument, or a script's first key)."""
    if not isinstance(client, RedisCluster):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies = pipe.execute(raise_on_error=False)
        _raise_first_error(replies)
        return replies
    # Pipelines of the nodes' own clients, not redis-py's cluster pipeline: that one sends every
    # command of a node that timed out again, one by one, and each waits out the timeout again
    # (a stalled node held an add for minutes).
    by_node: dict[str, tuple[object, list[int]]] = {}
    for position, command in enumerate(commands):
        node = client.get_node_from_key(command[3] if command[0] in ("EVAL", "EVALSHA") else command[1])
        by_node.setdefault(node.name, (node, []))[1].append(position)
    replies: list = [None] * len(commands)
    for name, (node, positions) in by_node.items():
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for position in positions:
            pipe.execute_command(*commands[position])
        try:
            for position, reply in zip(positions, pipe.execute(raise_on_error=False)):
                replies[position] = reply
        except RedisError as exc:
            exc.node_name = name  # read again last when the client refreshes its view of the cluster
            raise
    _raise_first_error(replies)
    return replies


def through_failover(client, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; on a Redis Cluster, run again while the cluster fails a lost node over.

    A node refused or a slot moved: again after a pause (0.1 s, doubling up to 2 s), for up to
    FAILOVER_SECONDS. A primary silent past the socket timeout: again at once if the cluster has
    replaced it meanwhile; if it has a replica, again once the cluster has replaced it (within
    FAILOVER_SECONDS more); without one, or silent twice, the silence is reported rather than
    waited out again. What ``fn`` sends must be safe to apply twice.
    """
    if not isinstance(client, RedisCluster):
        return fn(*args, **kwargs)
    deadline = time.monotonic() + FAILOVER_SECONDS
    pause, waited_out_silence = 0.1, False
    while True:
        primaries = _primaries(client)
        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            raise
        except RedisTimeoutError as exc:
            if waited_out_silence:
                raise
            waited_out_silence = True
            _read_slots(client, exc)  # replicas may have joined, or replaced the node, since the last read
            if _primaries(client) != primaries:
                # Failed over while the socket timeout ran (it can outlast cluster-node-timeout):
                # the silent node is no primary any more, so it has no replica to wait for.
                continue
            if not _has_replica(client, _node_name(exc)):
                raise
            deadline = time.monotonic() + FAILOVER_SECONDS
            pause = _wait(client, exc, pause, deadline, until=lambda: _primaries(client) != primaries)
        except _WHILE_FAILING_OVER as exc:
            pause = _wait(client, exc, pause, deadline)


def _wait(cluster: RedisCluster, exc: Exception, pause: float, deadline: float,
          until: Callable[[], bool] = lambda: True) -> float:
    """Pause and read the cluster's slots again until ``until()``, the pause doubling up to 2 s;
    raise ``exc`` once the deadline would pass. The next pause."""
    while True:
        if time.monotonic() + pause > deadline:
            raise exc
        time.sleep(pause)
        pause = min(2 * pause, 2.0)
        _read_slots(cluster, exc)
        if until():
            return pause


def _primaries(cluster: RedisCluster) -> set[str]:
    return {node.name for node in cluster.get_primaries()}


def _node_name(exc: Exception) -> str | None:
    """host:port of the node that failed: set by :func:`run`, or the connection redis-py attaches."""
    if getattr(exc, "node_name", None):
        return exc.node_name
    where = getattr(exc, "connection", None)
    if getattr(where, "name", None):  # a ClusterNode
        return where.name
    return f"{where.host}:{where.port}" if getattr(where, "host", None) else None


def _has_replica(cluster: RedisCluster, node_name: str | None) -> bool:
    """Whether the cluster could fail the primary ``node_name`` over: some slot it serves has a replica.
    (The client's slot table, [primary, replicas...] per slot: redis-py has no public view of it.)"""
    return any(len(nodes) > 1 and nodes[0].name == node_name for nodes in cluster.nodes_manager.slots_cache.values())


def _read_slots(cluster: RedisCluster, exc: Exception) -> None:
    """Have the client read which node serves which slots again, asking the node that failed last."""
    try:
        cluster.nodes_manager.initialize(last_failed_node_name=_node_name(exc))
    except (RedisError, RedisClusterException):
        pass  # no node answered: the next try fails and says so


def _raise_first_error(replies: list) -> None:
    """Raise the first error among the replies of a transaction or a pipeline run with
    ``raise_on_error=False`` (which redis-py returns, not raises)."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply


def _widen_send_buffer(connection) -> None:
    """Let whole batches wait in the kernel's socket buffer (the kernel caps the size, at 8 MiB
    here): ``sendall`` then returns at once and the client encodes the next batch while Redis
    reads this one, where the default buffer (208 KiB) held the client until Redis had read all
    but its last bytes (ingest of 1M vectors: 169k-232k/s -> 208k-247k/s over three runs each).
    redis-py has no option for it, so it is set on the connection's socket."""
    connection.connect()
    sock = getattr(connection, "_sock", None)
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


class CommandStream:
    """Sends batches of phases without waiting for their replies, at most ``depth`` batches in flight.

    Redis applies one connection's commands in the order sent, so a batch keeps its phase order
    (say vectors, then the records that make them visible) with no round trip between phases,
    and the client prepares the next batch while Redis stores this one. Each batch is a
    transaction (MULTI/EXEC): where Redis refuses one of its commands (out of memory, say), it
    applies none of them, where the phases sent alone would have made records visible whose
    vectors it had refused. ``done(token)`` runs once a batch's replies are all in. A Redis
    Cluster has no order across its nodes: there each phase is a :func:`run` that completes before
    the next is sent, and a phase with an error stops the batch (the caller runs the batch again
    through a failover: :func:`through_failover`).

    A lost connection (a server restart) is reconnected through the client's retries, then
    ``resumed()`` runs (it may raise to give up: the writer's lock gone with a server that kept
    nothing, say) and every batch in flight is sent again, whole: its commands must be safe to
    apply twice.
    """

    def __init__(self, client, depth: int = 2, done: Callable[[object], None] = lambda token: None,
                 resumed: Callable[[], None] = lambda: None):
        self.client = client
        self.depth = depth
        self.done = done
        self.resumed = resumed
        self.resumptions = 0  # how often the connection was lost and made again
        self.failed = False  # a batch's error was raised: the batches in flight then were not all stored
        self._cluster = isinstance(client, RedisCluster)
        self._connection = None if self._cluster else client.connection_pool.get_connection()
        if self._connection is not None:
            _widen_send_buffer(self._connection)
        self._in_flight: deque[tuple[object, int, list[bytes]]] = deque()

    def send(self, phases: Sequence[Sequence[Command]], token: object = None) -> None:
        if self._cluster:
            try:
                for phase in phases:
                    run(self.client, phase)
            finally:
                self.done(token)
            return
        commands = [("MULTI",), *(command for phase in phases for command in phase), ("EXEC",)]
        packed = _packed(commands)
        self._in_flight.append((token, len(commands), packed))
        self._receive_while(lambda: len(self._in_flight) > self.depth,
                            lambda: self._connection.send_packed_command(packed))

    def close(self) -> None:
        """Wait for every batch in flight; raises the first error among them."""
        if self._connection is None:
            return
        try:
            self._receive_while(lambda: bool(self._in_flight))
        finally:
            self.client.connection_pool.release(self._connection)
            self._connection = None

    def abandon(self) -> None:
        """Close without waiting for the replies of the batches in flight: for a server that stopped
        answering, where waiting would sit out the socket timeout again. Each batch is a transaction,
        so Redis applies each whole or not at all; every one counts as done (a re-run stores what is
        missing)."""
        if self._connection is None:
            return
        self._drop()
        self.client.connection_pool.release(self._connection)
        self._connection = None

    def _drop(self) -> None:
        """Disconnect with any replies left unread; every batch in flight counts as done."""
        self.failed = True
        self._connection.disconnect()
        while self._in_flight:
            self.done(self._in_flight.popleft()[0])

    def _receive_while(self, condition: Callable[[], bool], first: Callable[[], None] = lambda: None) -> None:
        """``first()``, then read the oldest batch's replies while ``condition()``; after a lost
        connection, see the class. After any other error, or the last resumption, the connection
        is dropped (replies may be left unread) and every batch counts as done."""
        try:
            for resumption in range(RESUMPTIONS + 1):
                try:
                    first()
                    while condition():
                        token, replies, _ = self._in_flight[0]
                        for _ in range(replies - 1):  # MULTI's and each command's: OK, QUEUED or why not
                            self._connection.read_response()
                        _raise_first_error(self._connection.read_response())  # EXEC's: the commands' replies
                        self._in_flight.popleft()
                        self.done(token)
                    return
                except RedisConnectionError:  # not a timeout: a server silent that long is reported
                    if resumption == RESUMPTIONS:
                        raise
                    self._reconnect()  # its own failure, after the client's retries, is final
                    first = self._send_in_flight
        except BaseException:
            self._drop()
            raise

    def _reconnect(self) -> None:
        self._connection.disconnect()
        _widen_send_buffer(self._connection)
        self.resumptions += 1
        self.resumed()

    def _send_in_flight(self) -> None:
        for _, _, packed in self._in_flight:
            self._connection.send_packed_command(packed)
