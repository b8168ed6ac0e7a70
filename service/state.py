"""What one running service holds: settings, metrics, the model engine and the served index."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from index import fields, layout
from index.errors import IndexStoreError
from index.read.store import IndexStore, open_current
from service.model.engine import Engine
from service.model.loading import Resources
from service.search.pacs import PacsFetcher
from service.search.searcher import Searcher
from service.search.stores import StoreSlot

from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service")


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    previous_version: str
    version: str
    images: int
    seconds: float


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.stores: StoreSlot | None = None
        self.searcher: Searcher | None = None
        # PACS images viewed are fetched in their own pool, never the shared one (service.search.pacs)
        self.pacs = PacsFetcher(settings, metrics.registry)
        self.reload_lock = asyncio.Lock()
        self.poller: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.stores is not None

    def attach(self, resources: Resources) -> None:
        """Take over a loaded bundle and index (blocking: warms the model up)."""
        engine = Engine(resources.bundle, resources.model_thread, self.settings, self.metrics)
        engine.warm_up()
        self.engine, self.stores = engine, StoreSlot(resources.store)
        self.searcher = Searcher(engine, self.stores, self.settings, self.pacs, self.metrics)
        self._publish(resources.store)
        log.info(
            "model %s, index version %s with %d images",
            engine.fingerprint,
            resources.store.version,
            resources.store.count,
        )

    async def start(self) -> None:
        assert self.engine is not None
        self.engine.start()
        if self.settings.reload_poll_seconds > 0:
            self.poller = asyncio.create_task(self._poll(), name="index-poller")

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            await asyncio.gather(self.poller, return_exceptions=True)
        if self.searcher is not None:
            self.searcher.close()
        if self.engine is not None:
            await self.engine.stop()
        if self.stores is not None:
            self.stores.close()

    async def reload(self) -> ReloadOutcome:
        """Serve the newest index version. Requests in flight finish on the version they started on.

        Raises ModelMismatchError when the new version was built with another model, and other
        IndexStoreErrors when it cannot be opened or is damaged (CorruptVersionError: files that
        do not load, fail `PRAGMA quick_check` or disagree on the image count); the current
        version keeps serving either way, and each failure counts as a "failed" reload.
        """
        assert self.engine is not None and self.stores is not None
        async with self.reload_lock:
            started = time.perf_counter()
            old = self.stores.current
            try:
                if not await run_in_threadpool(old.has_newer_version):
                    self.metrics.reloads.labels("unchanged").inc()
                    return ReloadOutcome(False, old.version, old.version, old.count, 0.0)
                new = await run_in_threadpool(
                    open_current, self.settings.index_root, self.engine.fingerprint
                )
            except IndexStoreError:
                self.metrics.reloads.labels("failed").inc()
                raise
            except Exception as err:  # FAISS, SQLite, NumPy or the OS failed on a file
                self.metrics.reloads.labels("failed").inc()
                raise IndexStoreError(
                    f"the new index version in {self.settings.index_root} cannot be opened "
                    f"({type(err).__name__}: {err}); still serving version {old.version}"
                ) from err
            self.stores.swap(new)
            self._publish(new)
            self.metrics.reloads.labels("switched").inc()
            seconds = time.perf_counter() - started
            log.info("index version %s -> %s (%d images)", old.version, new.version, new.count)
            return ReloadOutcome(True, old.version, new.version, new.count, seconds)

    def _publish(self, store: IndexStore) -> None:
        self.metrics.set_index(store.version, store.fingerprint, store.count)
        if note := fields.outdated_note(store.info, store.root):
            log.warning(note)

    async def _poll(self) -> None:
        """Switch to a newer index version by itself, every reload_poll_seconds.

        A version that cannot be served is logged and not checked again (versions never change:
        checking a damaged one reads all of it, every poll); polling goes on, so the next good
        version is picked up. Only cancellation (shutdown) ends the loop.
        """
        refused = None
        while True:
            await asyncio.sleep(self.settings.reload_poll_seconds)
            current = None
            try:
                current = await run_in_threadpool(layout.read_current, self.settings.index_root)
                if current is not None and current == refused:
                    continue
                await self.reload()
                refused = None
            except Exception as err:
                if current is None or current != refused:
                    log.warning("index not reloaded, still serving the old version: %s", err)
                refused = current
