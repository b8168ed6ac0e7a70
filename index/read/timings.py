"""How long each stage of one query took: the index's stages (filter, faiss, reports) and the
service's (queue, encode, decode, grouping, describe), added up per query.

One Timings per query, filled in as it goes (a stage that runs twice, as FAISS does when a
grouped search reads more hits, adds up); the service puts it in each search response
(`timings`) and in the convirt_search_stage_seconds histograms of /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The stages, in the order a query meets them. The service's:
DECODE = "decode"  # an image query's file decoded and preprocessed (the decode pool)
QUEUE = "queue"  # waiting for the model thread (micro-batching, service/model/batching.py)
ENCODE = "encode"  # the encoder call the query was batched into
# the index's (store.py):
FILTER = "filter"  # the ids filters and keywords allow (SQLite, FTS5)
FAISS = "faiss"  # nearest neighbours among them
REPORTS = "reports"  # a text query's report evidence: sentences, words, fusion (hybrid.py)
# the service's again (service/search/find.py, service/api/deps.py):
GROUPING = "grouping"  # metadata rows read, hits grouped by study, the chosen groups filled
DESCRIBE = "describe"  # the cards described (response items)
AUDIT = "audit"  # the request's audit entry written: /metrics only, after the answer is built
STAGES = (DECODE, QUEUE, ENCODE, FILTER, FAISS, REPORTS, GROUPING, DESCRIBE, AUDIT)


class Timings:
    """Milliseconds per stage of one query. Not shared between queries: a query's stages run one
    after another, whichever thread runs each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + max(seconds, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def ms(self) -> dict[str, float]:
        """{stage: milliseconds}, in the order the stages first ran."""
        return {stage: round(seconds * 1000, 3) for stage, seconds in self.seconds.items()}
