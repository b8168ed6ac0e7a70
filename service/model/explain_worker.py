"""Where heat-maps are computed: never on the model thread that text and image queries wait for.

A heat-map (convirt.explain) embeds 50 occluded copies of an image, 0.5 to 0.9 s of a CPU core
at the demo model's size. Run on the model thread, as before issue 21, it held every text query
that arrived meanwhile: 4 text clients beside 4 explain clients went from 21 ms to 3.6 s at p50.
Two places keep it off that thread (CONVIRT_EXPLAIN_WORKER):

- process (the default): a worker process started with the first heat-map (spawned, so that
  nothing of the server's threads is inherited; service.model.explain_process runs in it), holding its
  own copy of the bundle (the text tower let go), running torch on one thread at niceness
  CONVIRT_EXPLAIN_NICE. It shares no GIL with the server, and the OS scheduler gives the
  server's threads the CPU first: on the 2-core box text p99 beside 4 explain clients stayed
  within 1.7x of text p99 alone (docs/benchmarks.md, "Heat-maps beside text queries"). The price
  is memory, a second torch process (about 520 MB of its own at the demo model's size), and a
  few seconds, paid by the first heat-map after a start. If it dies (killed for memory, say) the
  heat-map in flight gets a 503 and the next one starts a new worker.
- thread: threads of this process sharing the model (no second copy), one torch thread each,
  niced too where the OS allows a thread its own niceness (Linux). They take the GIL between
  torch operations, so text queries wait a little more than with a process (same benchmark).

At most CONVIRT_EXPLAIN_CONCURRENCY heat-maps run at once; service.model.explainer queues the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np
import torch

from convirt.explain import HeatMap, occlusion_map
from convirt.inference import Embedder
from service.errors import Unavailable

from . import explain_process

log = logging.getLogger("service")


def lower_priority(nice: int) -> None:
    """Niceness `nice` for the calling thread (Linux: a thread has its own), else nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        log.debug("the heat-map threads run at the server's priority: no niceness here")


class HeatMapWorker:
    """Computes heat-maps off the model thread: in a worker process or in threads (module doc)."""

    def __init__(self, embedder: Embedder, kind: str, concurrency: int, nice: int):
        if kind not in ("process", "thread"):
            raise ValueError(f"the heat-map worker is a process or a thread, not {kind!r}")
        if kind == "process" and embedder.bundle.path is None:
            log.warning("heat-maps run in threads: the bundle was not loaded from a folder")
            kind = "thread"
        self.embedder = embedder
        self.kind = kind
        self.concurrency = concurrency
        self.nice = nice
        self.pool: Executor | None = None
        self.lock = threading.Lock()

    async def run(
        self, pixels: torch.Tensor, query: np.ndarray, space: str, size: tuple[int, int]
    ) -> HeatMap:
        """The heat-map of `pixels` (from `Embedder.preprocess`) for `query` in `space`, placed
        on an image of `size` (convirt.explain.occlusion_map). 503 explain_unavailable when the
        worker process died."""
        loop = asyncio.get_running_loop()
        pool = self._pool()
        try:
            if self.kind == "thread":
                return await loop.run_in_executor(
                    pool, self._occlusion_in_thread, pixels, query, space, size
                )
            array = pixels.numpy()
            return await loop.run_in_executor(
                pool, explain_process.occlusion, array, query, space, size
            )
        except BrokenProcessPool as err:
            self._replace(pool)
            log.error("the heat-map worker process stopped: %s", err)
            raise Unavailable(
                "explain_unavailable",
                "the heat-map worker stopped while computing this map (out of memory?); a new "
                "one starts with the next request: retry",
                retry_after=5,
            ) from err

    def close(self) -> None:
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _occlusion_in_thread(
        self, pixels: torch.Tensor, query: np.ndarray, space: str, size: tuple[int, int]
    ) -> HeatMap:
        return occlusion_map(self.embedder, pixels, query, space, original_size=size)

    def _pool(self) -> Executor:
        with self.lock:
            if self.pool is None:
                self.pool = self._new_pool()
            return self.pool

    def _new_pool(self) -> Executor:
        if self.kind == "thread":
            return ThreadPoolExecutor(
                max_workers=self.concurrency,
                thread_name_prefix="explain",
                initializer=self._start_thread,
            )
        bundle = self.embedder.bundle
        return ProcessPoolExecutor(
            max_workers=self.concurrency,
            mp_context=get_context("spawn"),  # a fork would copy the server's threads' state
            initializer=explain_process.start,
            initargs=(str(bundle.path), bundle.fingerprint, self.nice, str(self.embedder.device)),
        )

    def _start_thread(self) -> None:
        torch.set_num_threads(1)
        lower_priority(self.nice)

    def _replace(self, broken: Executor) -> None:
        with self.lock:
            if self.pool is broken:
                self.pool = None
        broken.shutdown(wait=False, cancel_futures=True)
