"""One thread for all of a process's torch work, where other threads serve requests or batches.

torch's OpenMP runtime (libgomp) gives each thread that computes a team of its own. Once the
teams of a process hold more threads than there are cores, libgomp stops letting idle team threads
spin and puts them to sleep between operations; a forward of many small operations then takes
about twice as long (docs/PERFORMANCE.md). A process whose torch work may come from several
threads (the service's batcher, a Ray actor's calls) runs it all on the one thread made here.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def torch_thread() -> ThreadPoolExecutor:
    """An executor of one thread, for model builds and forwards alike."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-torch")
