"""numba as cbir compiles with it (cbir/png.py, cbir/resample.py).

The code runs without the GIL, so that decoding threads run side by side, and is cached on disk
(2 s of compiling once, not in every process) wherever numba finds a writable place: beside the
module, or the user's cache folder. Where there is none, as in a read-only installation without
a home folder, each process compiles for itself rather than failing at import.
"""
from __future__ import annotations

from typing import Callable

import numba


def compiled(function: Callable | None = None, *, inline: bool = False):
    """``@compiled`` or ``@compiled(inline=True)`` (inlined into its compiled callers)."""
    options = {"nogil": True, "inline": "always" if inline else "never"}

    def compile_lazily(function: Callable):
        try:
            return numba.njit(function, cache=True, **options)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available for file ..."
            if "cannot cache" not in str(exc):
                raise
            return numba.njit(function, **options)

    return compile_lazily if function is None else compile_lazily(function)
