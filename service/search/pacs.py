"""Images a PACS holds, fetched for serving so that a slow PACS holds up nothing else.

An indexed image whose path is dicomweb://... is fetched from its PACS the first time it is
viewed (index.sources.remote.fetch_one, which for a PACS keeps the copy in $CONVIRT_CACHE_DIR/dicomweb
by content hash). That fetch used to run in the shared worker pool that also writes the audit log,
checks keys and reads SQLite, with no overall deadline: 45 views of one image from a PACS that
trickled a byte every 5 s held 40 of its threads, and every text search, thumbnail and other
image waited behind them (one search took 440 s after the PACS recovered). So here:

- Fetches run in their own small pool (CONVIRT_PACS_THREADS daemon threads) and nowhere else. A
  fetch that hangs holds one of these threads and no thread the rest of the service needs.
- Each fetch has a total deadline (CONVIRT_PACS_DEADLINE_S): past it the viewers get a 504
  `pacs_timeout`. Its thread stays busy until the PACS client gives up (remote.fetch_one is
  given the deadline), which is why the pool is small and bounded.
- When every thread is busy and CONVIRT_PACS_QUEUE fetches already wait, a new fetch is refused
  at once: 503 `pacs_busy` with Retry-After, never a wait in line.
- One fetch per image at a time: concurrent views of one image await the same fetch.
- The local copy is looked for first, and served without the pool.
- A PACS that just failed (the deadline passed, no connection, a 5xx) is remembered for
  CONVIRT_PACS_RETRY_S: views of its images get a 503 `pacs_unavailable` with Retry-After at
  once instead of each waiting out the deadline.
- What the fetches found is kept per PACS server and shown by /readyz (PacsFetcher.readiness).

A local file is served from the path the index recorded for its id, if it is still there
unchanged (indexed_file).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool

from index.sources import remote
from service.errors import NotFound, TimedOut, Unavailable
from service.settings import Settings

log = logging.getLogger("service")

MIN_LEFT_S = 0.1  # a queued fetch with less time left than this is not started
Outcome = Literal["fetched", "cached", "joined", "timeout", "busy", "unavailable", "failed"]


# -- what /readyz shows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PacsServerStatus:
    url: str
    status: Literal["reachable", "unreachable", "unknown"]  # unknown: nothing fetched yet
    last_ok_at: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    fetching: int = 0  # fetches from it now running or waiting


@dataclass(frozen=True)
class PacsStatus:
    """What the fetches found (api/responses.py PacsReadiness: its fields on /readyz)."""

    status: Literal["ok", "degraded", "unused"]  # degraded: a PACS failed its last fetch
    threads: int
    busy: int  # fetch threads in use (one stuck past its deadline counts)
    queued: int
    servers: list[PacsServerStatus] = field(default_factory=list)


# -- the pool --------------------------------------------------------------------------------------


class PoolFull(Exception):
    pass


class FetchPool:
    """`threads` daemon threads and a queue of at most `waiting` jobs; submit() raises PoolFull
    past that rather than wait. A job is given the seconds left before its deadline, and one
    whose deadline passed while it waited is dropped unrun (nobody awaits it any more). Daemon
    threads: one stuck on a PACS never holds up the exit."""

    def __init__(self, threads: int, waiting: int):
        self.threads = threads
        self.jobs: queue.Queue[tuple[Callable[[float], Any], float, Future]] = queue.Queue(
            maxsize=waiting
        )
        self.busy = 0
        self._lock = threading.Lock()
        self._started = False

    def submit(self, work: Callable[[float], Any], deadline: float) -> Future:
        """work(seconds left) in a pool thread, by `deadline` (time.monotonic())."""
        self._start()
        future: Future = Future()
        try:
            self.jobs.put_nowait((work, deadline, future))
        except queue.Full:
            raise PoolFull from None
        return future

    def _start(self) -> None:
        """The threads, at the first fetch: a service that never views a PACS image has none."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for n in range(self.threads):
            threading.Thread(target=self._work, name=f"pacs-{n}", daemon=True).start()

    def _work(self) -> None:
        while True:
            work, deadline, future = self.jobs.get()
            left = deadline - time.monotonic()
            if left < MIN_LEFT_S:
                future.cancel()  # its viewers are being told it timed out
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self.busy += 1
            try:
                future.set_result(work(left))
            except BaseException as err:  # handed to the viewers, never lost
                future.set_exception(err)
            finally:
                with self._lock:
                    self.busy -= 1


# -- per server ------------------------------------------------------------------------------------


@dataclass
class ServerState:
    url: str
    last_ok: float | None = None  # wall-clock times, for /readyz
    last_error: str | None = None
    last_error_at: float | None = None
    failing_until: float = 0.0  # monotonic: refuse at once before this
    fetching: int = 0

    def succeeded(self) -> None:
        self.last_ok, self.failing_until = time.time(), 0.0

    def failed(self, message: str, retry_s: float) -> None:
        self.last_error, self.last_error_at = message, time.time()
        self.failing_until = time.monotonic() + retry_s

    def describe(self) -> PacsServerStatus:
        if self.last_error_at is not None and (self.last_ok or 0) < self.last_error_at:
            status = "unreachable"
        else:
            status = "reachable" if self.last_ok is not None else "unknown"
        return PacsServerStatus(
            url=self.url,
            status=status,
            last_ok_at=_iso(self.last_ok),
            last_error=self.last_error if status == "unreachable" else None,
            last_error_at=_iso(self.last_error_at),
            fetching=self.fetching,
        )


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the fetcher -----------------------------------------------------------------------------------


class PacsFetcher:
    """Local copies of PACS images for serving: a bounded pool, a deadline, single flight."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.deadline_s = settings.pacs_deadline_s
        self.retry_s = settings.pacs_retry_s
        self.pool = FetchPool(settings.pacs_threads, settings.pacs_queue)
        self.servers: dict[str, ServerState] = {}
        self.flights: dict[tuple[str, str], asyncio.Future[Path]] = {}
        self.fetches = Counter(
            "convirt_pacs_fetches",
            "Views of PACS images, by outcome (fetched, cached, joined: awaited another view's "
            "fetch, timeout, busy, unavailable: the PACS failed moments ago, failed)",
            ["outcome"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    async def file(self, row: Mapping[str, Any]) -> Path:
        """The file to serve for an indexed row: its path, or a local copy of a PACS image."""
        if not remote.is_remote(row["path"]):
            return await run_in_threadpool(indexed_file, row)
        return await self.local_copy(row)

    async def local_copy(self, row: Mapping[str, Any]) -> Path:
        cached = await run_in_threadpool(remote.cached_copy, row)
        if cached is not None:
            self._count("cached")
            return cached
        server = self.servers.setdefault(remote.server_of(row), ServerState(remote.server_of(row)))
        key = (row["path"], row["sha256"])
        flight = self.flights.get(key)
        if flight is None:
            self._refuse_if_failing(server, row)
            flight = asyncio.ensure_future(self._fetch(dict(row), server))
            self.flights[key] = flight
            flight.add_done_callback(lambda _: self.flights.pop(key, None))
        else:
            self._count("joined")
        # shielded: a viewer who disconnects does not cancel the fetch the others await
        return await asyncio.shield(flight)

    def readiness(self, known: list[str] = ()) -> PacsStatus:
        """The PACS section of /readyz: every server fetched from (and those `known` from the
        index version), what its last fetch found."""
        for url in known:
            self.servers.setdefault(url.rstrip("/"), ServerState(url.rstrip("/")))
        servers = [state.describe() for state in self.servers.values()]
        if any(server.status == "unreachable" for server in servers):
            status = "degraded"
        else:
            status = "ok" if servers else "unused"
        return PacsStatus(
            status=status,
            threads=self.pool.threads,
            busy=self.pool.busy,
            queued=self.pool.jobs.qsize(),
            servers=servers,
        )

    async def _fetch(self, row: dict[str, Any], server: ServerState) -> Path:
        deadline = time.monotonic() + self.deadline_s
        try:
            future = self.pool.submit(partial(remote.fetch_one, row), deadline)
        except PoolFull:
            self._count("busy")
            raise Unavailable(
                "pacs_busy",
                f"{self.pool.threads} fetches from the PACS are running and "
                f"{self.pool.jobs.maxsize} wait: image {row['id']} cannot be fetched now. "
                f"Retry in {math.ceil(self.deadline_s)} s",
                retry_after=math.ceil(self.deadline_s),
            ) from None
        server.fetching += 1
        try:
            path = await asyncio.wait_for(asyncio.wrap_future(future), self.deadline_s)
        except TimeoutError:
            raise self._timed_out(row, server) from None
        except asyncio.CancelledError:
            if not future.cancelled():
                raise
            raise self._timed_out(row, server) from None  # dropped unrun: its time was up
        except Exception as err:
            from index.errors import IndexStoreError

            if not isinstance(err, IndexStoreError):
                raise
            if time.monotonic() >= deadline - MIN_LEFT_S:  # the client's own deadline, first
                raise self._timed_out(row, server) from None
            self._count("failed")
            if remote.server_failed(row, err):
                server.failed(str(err), self.retry_s)
                raise Unavailable(
                    "pacs_unavailable",
                    f"image {row['id']} is indexed from a PACS that cannot give it now: {err}",
                    retry_after=max(1, math.ceil(self.retry_s)),
                ) from None
            server.succeeded()  # it answered: the instance is what failed
            raise NotFound(
                "image_file_unavailable",
                f"image {row['id']} is indexed from a PACS that cannot give it now: {err}",
            ) from None
        finally:
            server.fetching -= 1
        server.succeeded()
        self._count("fetched")
        return path

    def _timed_out(self, row: Mapping[str, Any], server: ServerState) -> TimedOut:
        message = f"did not give an image within {self.deadline_s:g} s"
        server.failed(message, self.retry_s)
        self._count("timeout")
        log.warning("the PACS at %s %s (image %s)", server.url, message, row["id"])
        return TimedOut(
            "pacs_timeout",
            f"image {row['id']} is indexed from the PACS at {server.url}, which {message}; "
            "searches are unaffected. Retry later, or ask whoever runs the PACS",
            retry_after=max(1, math.ceil(self.retry_s)),
        )

    def _refuse_if_failing(self, server: ServerState, row: Mapping[str, Any]) -> None:
        left = server.failing_until - time.monotonic()
        if left <= 0:
            return
        self._count("unavailable")
        raise Unavailable(
            "pacs_unavailable",
            f"image {row['id']} is indexed from the PACS at {server.url}, which "
            f"{server.last_error} moments ago; not asked again for {left:.0f} s. Searches are "
            "unaffected",
            retry_after=max(1, math.ceil(left)),
        )

    def _count(self, outcome: Outcome) -> None:
        self.fetches.labels(outcome).inc()


# -- an indexed file on disk -----------------------------------------------------------------------


def indexed_file(row: Mapping[str, Any]) -> Path:
    """The recorded path, if it still holds a regular file of the recorded size: only the path
    the index recorded for an id is ever served. An image from a PACS (a dicomweb:// path:
    index.sources.remote) is fetched from it once, here in the calling thread, and served from a
    local copy. The service never calls this for a PACS image: it fetches through
    PacsFetcher.file (its own pool, a deadline, one fetch per image)."""
    if remote.is_remote(row["path"]):
        from index.errors import IndexStoreError

        try:
            return remote.fetch_one(row)
        except IndexStoreError as err:
            raise NotFound(
                "image_file_unavailable",
                f"image {row['id']} is indexed from a PACS that cannot give it now: {err}",
            ) from None
    path = Path(row["path"])
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file() or stat.st_size != row["size_bytes"]:
        raise NotFound(
            "image_file_missing",
            f"image {row['id']} is indexed, but its file was moved or changed since; "
            "run `convirt index verify` and re-add it",
        )
    return path
