"""Where a process's torch work runs, when requests or batches come from several threads.

Two costs of running torch off a process's main thread, both measured (docs/PERFORMANCE.md):
- torch's OpenMP runtime (libgomp) gives each thread that computes a team of its own. Once the
  teams of a process hold more threads than there are cores, libgomp stops letting idle team
  threads spin and puts them to sleep between operations: a forward of many small operations takes
  about twice as long. So all of it runs on the one thread made by :func:`torch_thread`.
- glibc gives each thread other than the main one a malloc arena of bounded heaps, so a batch's
  activations (tens of MB) are mapped and faulted in afresh at every forward. One arena for the
  whole process (:data:`ONE_ARENA` in a new process's environment, or :func:`use_one_arena`
  before threads start) keeps them in the main heap, where freed memory is reused.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from concurrent.futures import ThreadPoolExecutor

ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}
_M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)


def torch_thread() -> ThreadPoolExecutor:
    """An executor of one thread, for model builds and forwards alike."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-torch")


def use_one_arena() -> None:
    """One malloc arena for this process (call it before starting threads) and the processes it
    starts. Nothing to do where the C library is not glibc."""
    os.environ.update(ONE_ARENA)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 1)
