"""The audit log of a database: every add and removal made through the service (who, when, what),
kept in Redis with the database, newest first."""
from __future__ import annotations

import json
import time

from cbir.service.tokens import Holder
from cbir.store.database import VectorStore

AUDIT = "audit"  # cbir:<db>:audit, a list of JSON entries, newest first
KEPT, SHOWN = 10_000, 100


def record(store: VectorStore, holder: Holder, what: str) -> None:
    entry = json.dumps({"who": holder.name, "role": holder.role, "when": time.time(), "what": what})
    key = store.register_key(AUDIT)  # so that dropping the database drops its log
    store.execute("writing the audit log of", [("LPUSH", key, entry), ("LTRIM", key, 0, KEPT - 1)])


def entries(store: VectorStore, count: int = SHOWN) -> list[dict]:
    stored = store.call("reading", store.client.lrange, store.key(AUDIT), 0, count - 1)
    return [json.loads(entry) for entry in stored]


def listed(names: list[str], shown: int = 20) -> str:
    """Names for a log entry: the first ``shown`` of them, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
