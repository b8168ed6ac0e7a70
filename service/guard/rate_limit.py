"""The per-caller token bucket behind CONVIRT_RATE_LIMIT_PER_MINUTE and CONVIRT_RATE_LIMIT_BURST
(service.guard.access charges it)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket per caller, in memory: `per_minute` requests a minute, `burst` at once."""

    MAX_BUCKETS = 100_000

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(max(1, burst))
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, when)

    def take(self, who: str, cost: float = 1.0) -> float:
        """0 when the request may go ahead (`cost` tokens are spent: a request that takes more
        of the model than a query, a heat-map, costs more), else seconds until it may. A cost
        above the burst is charged as the whole burst."""
        cost = min(cost, self.capacity)
        now = self.clock()
        tokens, then = self.buckets.get(who, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        if tokens >= cost:
            self.buckets[who] = (tokens - cost, now)
            return 0.0
        if len(self.buckets) >= self.MAX_BUCKETS:
            self._forget_full(now)
        self.buckets[who] = (tokens, now)
        return (cost - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have filled up again: they are the same as no bucket."""
        self.buckets = {
            who: (tokens, then)
            for who, (tokens, then) in self.buckets.items()
            if tokens + (now - then) * self.rate < self.capacity
        }
