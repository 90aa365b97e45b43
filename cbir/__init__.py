"""cbir: content-based medical image retrieval on metric-learned features, Redis and FAISS."""

__version__ = "0.1.0"

import time as _time

IMPORTED_AT = _time.perf_counter()  # where a one-shot command's --verbose timings start
