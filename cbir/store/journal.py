"""The journal of a database: every committed change, kept once an index is trained, so that a
loaded index can be brought up to date instead of rebuilt."""
from __future__ import annotations

import numpy as np


class JournalMixin:
    """The journal of :class:`~cbir.store.database.VectorStore`."""

    # --------------------------------------------------------------- journal
    @property
    def journal_key(self) -> str:
        return self.prefix + "journal"

    def start_journal(self) -> tuple[int, int]:
        """Record every later change in the journal; returns (data version, journal length) now.

        Call it holding :meth:`writing`, so that no change slips between the two numbers.
        """
        self.call("writing", self.client.hset, self.info_key, "journal", 1)
        self._info["journal"] = "1"
        return self.version(), int(self.call("reading", self.client.llen, self.journal_key))

    def trim_journal(self, start: int) -> None:
        """Forget the journal's entries before ``start`` (they are in a saved index)."""
        self.call("writing", self.client.ltrim, self.journal_key, start, -1)

    def changes(self, start: int) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """(data version, journal entries from ``start`` on as (``"+"`` or ``"-"``, ids))."""
        version, entries = self.execute("reading", [("HGET", self.info_key, "version"),
                                                    ("LRANGE", self.journal_key, start, -1)])
        return int(version or 0), [(e[:1].decode(), np.frombuffer(e[1:], "<i8").astype(np.int64))
                                   for e in entries]
