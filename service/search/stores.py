"""The index version being served, swapped on reload without disturbing requests in flight.

A request leases the current IndexStore for its whole life. A reload opens the new version first,
then swaps the slot; the old store is closed only when the last request leasing it is done.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from index.read.store import IndexStore


class StoreSlot:
    def __init__(self, store: IndexStore):
        self._current = store
        self._leases: dict[int, int] = {id(store): 0}
        self._retired: dict[int, IndexStore] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> IndexStore:
        return self._current

    @contextmanager
    def lease(self) -> Iterator[IndexStore]:
        """The current store, kept open until the block ends even if a reload swaps it out."""
        with self._lock:
            store = self._current
            self._leases[id(store)] += 1
        try:
            yield store
        finally:
            self._release(store)

    def swap(self, store: IndexStore) -> IndexStore:
        """Serve `store` from now on; returns the previous one (closed once unleased)."""
        with self._lock:
            old, self._current = self._current, store
            self._leases.setdefault(id(store), 0)
            self._retired[id(old)] = old
        self._release(old, lease=False)
        return old

    def close(self) -> None:
        with self._lock:
            stores = [self._current, *self._retired.values()]
            self._retired.clear()
        for store in stores:
            store.close()

    def _release(self, store: IndexStore, lease: bool = True) -> None:
        with self._lock:
            key = id(store)
            if lease:
                self._leases[key] -= 1
            if key not in self._retired or self._leases[key] > 0:
                return
            del self._retired[key], self._leases[key]
        store.close()
