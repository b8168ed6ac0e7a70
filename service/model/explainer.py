"""Heat-maps (GET /v1/explain) under a budget, so that they never starve text and image queries.

A heat-map takes the model 50 times as long as a query. Before issue 21 each one held the one
model thread for 0.5-0.9 s, every text query waited behind it (4 text clients beside 4 explain
clients: p50 21 ms -> 3.6 s), and a key's 1,200 requests a minute bought it 10-18 s of model time
a second. Now, besides running them in their own worker (service.model.explain_worker):

- a bounded queue: at most CONVIRT_EXPLAIN_CONCURRENCY heat-maps are computed at once and
  CONVIRT_EXPLAIN_QUEUE wait; past that a 503 explain_busy at once, with a Retry-After from the
  time heat-maps have been taking, instead of a wait that grows with every client;
- a cost: a computed heat-map counts as CONVIRT_EXPLAIN_RATE_COST requests of the caller's rate
  limit (service.guard.access), so one key buys at most about half a second of worker time a second;
- a cache: the last CONVIRT_EXPLAIN_CACHE_ENTRIES maps by (index version, image, query), so the
  page's "Why?" pressed again, or by the next reader of the same result, costs nothing; identical
  requests in flight share one computation (and one place in the queue).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import numpy as np
import torch

from convirt.explain import HeatMap
from service.errors import Unavailable

from .explain_worker import HeatMapWorker

T = TypeVar("T")
FIRST_GUESS_S = 1.0  # the time a heat-map is taken to need before one has been timed
SMOOTHING = 0.2  # weight of the latest heat-map's time in the running estimate


def query_key(
    text: str | None, query_id: int | None, upload_id: str | None = None
) -> tuple[str, str]:
    """What a heat-map is of, for the cache: the text's digest (not the text: the cache is no
    second copy of what readers typed), the query image's id or the kept upload's id (a token
    only its uploader holds, service.search.kept)."""
    if text is not None:
        return ("text", hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if upload_id is not None:
        return ("upload", upload_id)
    return ("image", str(query_id))


class LruCache(Generic[T]):
    """The `capacity` most recently used entries (0: keeps nothing)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable) -> T | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: Hashable, value: T) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class Explainer(Generic[T]):
    """Admission, cost, cache and single flight of heat-maps; the worker computes them."""

    def __init__(
        self, worker: HeatMapWorker, concurrency: int, queue: int, cache_entries: int
    ) -> None:
        self.worker = worker
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self.cache: LruCache[T] = LruCache(cache_entries)
        self.flights: dict[Hashable, asyncio.Task[T]] = {}
        self.admitted = 0  # heat-maps being computed or waiting (one event loop: no lock)
        self.slots = asyncio.Semaphore(concurrency)
        self.seconds = FIRST_GUESS_S

    async def explain(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[T]],
        charge: Callable[[], None],
        cache_key: Callable[[T], Hashable],
    ) -> tuple[T, bool]:
        """(the explanation of `key`, whether it came from the cache). A miss is admitted (503
        explain_busy when the queue is full), then charged (`charge` raises the 429), then
        `compute`d, once however many ask for it meanwhile; stored under `cache_key` of it."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        flight = self.flights.get(key)
        if flight is None:
            self._admit()
            try:
                charge()
            except BaseException:
                self.admitted -= 1
                raise
            flight = asyncio.create_task(self._compute(key, compute, cache_key))
            flight.add_done_callback(_retrieve)
            self.flights[key] = flight
        # shielded: a reader who gives up does not cancel the map others wait for (it is cached)
        return await asyncio.shield(flight), False

    async def heat_map(
        self, pixels: torch.Tensor, query: np.ndarray, space: str, size: tuple[int, int]
    ) -> HeatMap:
        """One heat-map in the worker, when one of `concurrency` slots is free."""
        async with self.slots:
            started = time.perf_counter()
            heat_map = await self.worker.run(pixels, query, space, size)
            took = time.perf_counter() - started
            self.seconds += SMOOTHING * (took - self.seconds)
            return heat_map

    def close(self) -> None:
        self.worker.close()

    def _admit(self) -> None:
        if self.admitted >= self.capacity:
            ahead = self.admitted - self.concurrency + 1
            seconds = max(1, math.ceil(ahead * self.seconds / self.concurrency))
            raise Unavailable(
                "explain_busy",
                f"{self.admitted} heat-maps are being computed or waiting, the most the server "
                f"takes at once (CONVIRT_EXPLAIN_CONCURRENCY + CONVIRT_EXPLAIN_QUEUE); retry in "
                f"{seconds} s",
                {"retry_after_seconds": seconds},
                retry_after=seconds,
            )
        self.admitted += 1

    async def _compute(
        self,
        key: Hashable,
        compute: Callable[[], Awaitable[T]],
        cache_key: Callable[[T], Hashable],
    ) -> T:
        try:
            found = await compute()
            self.cache.put(cache_key(found), found)
            return found
        finally:
            self.admitted -= 1
            self.flights.pop(key, None)


def _retrieve(task: asyncio.Task) -> None:
    """Read a flight's outcome, so that one whose readers all left logs no 'never retrieved'."""
    if not task.cancelled():
        task.exception()
