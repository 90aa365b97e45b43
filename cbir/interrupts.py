"""Ctrl-C and SIGTERM as exceptions that a pipeline takes at its own safe points.

Python raises a signal's exception in the main thread at whatever it is doing. Inside a hand-over
to a worker thread (a ``queue.Queue`` put, a thread join, a future's wait) that can leave the
hand-over's lock or wake-up half done, and the run hangs: a loop of a main thread filling a queue
for a writer thread hung in 1 of 300 SIGTERMs here. Inside :func:`held` a signal is only noted,
and raised by :func:`check` (where the caller has no hand-over under way) or on leaving.

Outside :func:`held` the exception is raised at once, wherever the main thread is; code that
swallows exceptions can then swallow it (one landed in numpy's lazy import of ``numpy.random``, and
a killed benchmark ran to its end). So each signal stays noted until its exception leaves
:func:`as_exceptions`: :func:`check` raises it again, as does leaving :func:`as_exceptions` normally.

The CLI installs the handlers (:func:`as_exceptions`); a library caller keeps its own, and then
:func:`held` changes nothing.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(Exception):
    """SIGTERM (kill, timeout, a job scheduler), raised in the main thread as Ctrl-C is."""


_held = 0
_pending: BaseException | None = None


def _on_signal(signum, frame) -> None:
    global _pending
    _pending = _pending or (KeyboardInterrupt() if signum == signal.SIGINT else Terminated())
    if not _held:
        raise _pending


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def as_exceptions() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt and Terminated (held back inside :func:`held`).

    Without this, Python dies of SIGTERM without unwinding: no writer finishes its batch and no
    exit handler stops the embedded redis-server. Only the main thread may set signal handlers;
    elsewhere both signals keep theirs.
    """
    global _pending
    if not _in_main_thread():
        yield
        return
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, _on_signal) for number in numbers}
    # A process inherits its parent's blocked signals: started by one that blocks SIGTERM (a test
    # runner after some libraries' threads had run), the handler never ran and a killed benchmark
    # ran to its end.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, numbers) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    except BaseException:
        _pending = None  # the work stopped: a signal noted is answered, by its own exception or another
        raise
    else:
        check()  # a signal whose exception was swallowed on the way: the work did not end as asked
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


@contextmanager
def held() -> Iterator[None]:
    """Signals arriving inside are noted, and raised by :func:`check` or on leaving."""
    global _held
    if not _in_main_thread():  # signals run their handlers in the main thread only
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held:
            check()


def check() -> None:
    """Raise the signal noted so far, if any: call where no hand-over to a thread is under way."""
    global _pending
    if _pending is not None:
        exception, _pending = _pending, None
        raise exception
