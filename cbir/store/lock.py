"""The writer lock of a database: one writer at a time, a dead writer's lock taken over."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import psutil
import redis

from cbir.errors import DatabaseBusyError, LockWaitWarning, StoreError
from cbir.store.redis.failures import as_text, stopped_answering

if TYPE_CHECKING:
    from cbir.store.database import VectorStore

LOCK_TTL_SECONDS = 120
# The lock is replaced or released only by whoever read its current token: another process may
# have taken it in between (a dead holder's lock taken over by two waiters, an expired one).
_SET_IF_EQUAL = ("if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
                 "redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1")
_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end return redis.call('del', KEYS[1])"
# Renewed only by its holder: a writer paused past the time-out must not extend a lock that
# another writer has taken since.
RENEW_IF_EQUAL = "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end return redis.call('expire', KEYS[1], ARGV[2])"


class LockingMixin:
    """The writer lock of :class:`~cbir.store.database.VectorStore`."""

    # ------------------------------------------------------------------ lock
    @contextmanager
    def writing(self) -> Iterator["VectorStore"]:
        """Hold the database's writer lock, waiting up to ``lock_wait`` seconds for another writer
        (said once, as a :class:`LockWaitWarning`); a lock left by a dead process on this host is
        taken over, one left on another host expires :data:`LOCK_TTL_SECONDS` after its last write."""
        key = self.prefix + "lock"
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.lock_wait
        holder = self._take_lock(key, token)
        if holder and self.lock_wait > 0:
            warnings.warn(f"database '{self.name}' is being written by another process ({holder}); waiting up to "
                          f"{self.lock_wait:g} s for it to finish", LockWaitWarning, stacklevel=3)
        while holder and time.monotonic() < deadline:
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
            holder = self._take_lock(key, token)
        if holder:
            waited = f"waited {self.lock_wait:g} s; " if self.lock_wait > 0 else ""
            raise DatabaseBusyError(
                f"database '{self.name}' is being written by another process ({holder}); {waited}wait for it "
                f"(--wait SECONDS), or delete the key {key} if that process is gone (its lock expires "
                f"{LOCK_TTL_SECONDS} s after its last write)")
        self._lock_token = token
        self._lock_renewed = time.monotonic()
        self._names = None  # names added since an earlier lock are not in it
        self.refresh()  # another process may have changed the database (e.g. started its journal)
        server_gone = False
        try:
            yield self
        except StoreError as exc:
            server_gone = stopped_answering(exc)
            raise
        finally:
            self._lock_token = None
            self._names = None
            self._unsettled.clear()
            # With the server gone, releasing would wait out the client's retries a second time. The
            # lock expires by itself, and a re-run on this host takes it over from the dead process.
            if not server_gone:
                try:
                    self.client.eval(_DELETE_IF_EQUAL, 1, key, token)
                except redis.RedisError:
                    pass  # the lock expires by itself

    def _take_lock(self, key: str, token: str) -> str | None:
        """Take the writer lock with ``token``: None when taken, else the live holder's token."""
        while not self.call("locking", self.client.set, key, token, nx=True, ex=LOCK_TTL_SECONDS):
            holder = as_text(self.call("locking", self.client.get, key) or b"")
            host, _, rest = holder.partition(":")
            pid = rest.partition(":")[0]
            if not holder:
                continue  # released in between
            if not (host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))):
                return holder
            if self.call("locking", self.client.eval, _SET_IF_EQUAL, 1, key, holder, token, LOCK_TTL_SECONDS):
                return None
        return None

    def renew_lock(self, always: bool = False) -> None:
        """Extend this writer's lock by :data:`LOCK_TTL_SECONDS`, or stop before writing anything
        more if it is no longer this writer's: the process was paused or cut off past the time-out
        and another writer took the lock, or a server restarted without its data.

        Asked of Redis once half the time-out has passed since the last renewal (or ``always``):
        until then the lock cannot have expired, as the monotonic clock counts a pause too."""
        token = self._lock_token  # read once: lock_kept's thread may renew as the writer lets go
        if not token:
            return
        if not always and time.monotonic() - self._lock_renewed < LOCK_TTL_SECONDS / 2:
            return
        key = self.prefix + "lock"
        asked = time.monotonic()
        if self.call("writing to", self.client.eval, RENEW_IF_EQUAL, 1, key, token, LOCK_TTL_SECONDS):
            self._lock_renewed = asked
            return
        holder = as_text(self.call("checking the writer lock of", self.client.get, key) or b"")
        now = f"{holder} holds it now" if holder else "no process holds it now"
        raise StoreError(
            f"database '{self.name}': Redis no longer holds this run's writer lock ({now}: the run was paused or "
            f"cut off for over {LOCK_TTL_SECONDS} s, or the server restarted without its data); nothing more is "
            f"written, what was stored is kept: re-run to continue")

    @contextmanager
    def lock_kept(self) -> Iterator[None]:
        """Inside, a thread renews this writer's lock every quarter of :data:`LOCK_TTL_SECONDS`: for a
        writer that waits on work done elsewhere (Ray's workers, whose first results may take minutes
        on a busy cluster) and would otherwise renew it only when it writes. A pause of the whole
        process still lets the lock expire. A renewal that fails leaves the loss to the writer's next
        :meth:`renew_lock`, which stops the run; the thread is not waited for on leaving (a renewal
        held up by a silent server would add its socket timeout to the run's own error)."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(LOCK_TTL_SECONDS / 4):
                try:
                    self.renew_lock(always=True)
                except Exception:  # whatever failed, the writer's next renew_lock finds it and says so
                    return

        threading.Thread(target=keep, name=f"cbir writer lock of {self.name}", daemon=True).start()
        try:
            yield
        finally:
            stop.set()

    def check_lock_kept(self) -> None:
        """After a write's connection was made again: the writer lock must still be this run's
        (a server that restarted without its data lost it however recently it was renewed)."""
        self.renew_lock(always=True)
