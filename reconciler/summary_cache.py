"""The encoded answers of recently read run summaries, kept by the HTTP API."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

SUMMARY_CACHE_ENTRIES: Final = 10_000
SUMMARY_CACHE_TTL_S: Final = 600.0


class SummaryCache:
    """The encoded answers of recently read finalized summaries, which never change.

    Bounded (least recently used go first) and aged out, so a batch deleted by an
    operator and submitted again under the same id is not answered from memory forever.
    """

    def __init__(self, entries: int = SUMMARY_CACHE_ENTRIES, ttl_s: float = SUMMARY_CACHE_TTL_S):
        self._entries = entries
        self._ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, batch_id: str) -> bytes | None:
        item = self._items.get(batch_id)
        if item is None or item[0] < time.monotonic():
            return None
        self._items.move_to_end(batch_id)
        return item[1]

    def put(self, batch_id: str, body: bytes) -> None:
        self._items[batch_id] = (time.monotonic() + self._ttl_s, body)
        self._items.move_to_end(batch_id)
        while len(self._items) > self._entries:
            self._items.popitem(last=False)
