"""cbir.compiled: numba's cache where it can have one, compiling anyway where it cannot."""
from __future__ import annotations

import numba
import pytest

from cbir import png
from cbir.compiled import compiled


def test_code_numba_has_nowhere_to_cache_compiles_without_a_cache():
    namespace = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # no source file, so no place for a cache
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(namespace["double"], cache=True)
    assert compiled(namespace["double"])(21) == 42


def test_the_decoders_code_is_cached_on_disk():
    assert png._unfilter_band._cache._cache_path.endswith("__pycache__")
