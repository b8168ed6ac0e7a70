"""Micro-batching: concurrent queries share one encoder call, run off the event loop.

Requests `await batcher.submit(item)`. One worker task takes the first queued item, then whatever
else is already queued; when the last call was a batch (the service is busy) it also waits up to
`window_s` for more, until `max_batch`. The batch runs in the model's executor thread, so the event
loop keeps accepting requests while the model works, and those requests form the next batch.
A lone query on an idle service never waits: latency at concurrency 1 is the model's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
BatchObserver = Callable[[int, float], None]


class BatcherStopped(RuntimeError):
    """The service is shutting down; the query was not run."""


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        executor: Executor,
        window_s: float = 0.005,
        max_batch: int = 32,
        observe: BatchObserver | None = None,
    ):
        self.run_batch = run_batch
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.observe = observe
        self.queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] | None = None
        self.worker: asyncio.Task | None = None
        self.last_batch_size = 0
        self.running: list[asyncio.Future[Result]] = []

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
            self.worker = None
        pending = list(self.running)
        while self.queue is not None and not self.queue.empty():
            pending.append(self.queue.get_nowait()[1])
        for future in pending:
            if not future.done():
                future.set_exception(BatcherStopped("the service is shutting down"))

    async def submit(self, item: Item) -> Result:
        if self.queue is None or self.worker is None:
            raise BatcherStopped("the service is not running")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            await self._run(batch)

    async def _collect(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        assert self.queue is not None
        batch = [await self.queue.get()]
        self._drain(batch)
        if self.last_batch_size > 1 and self.window_s > 0:
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
                self._drain(batch)
        return batch

    def _drain(self, batch: list) -> None:
        assert self.queue is not None
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        live = [(item, future) for item, future in batch if not future.done()]  # not cancelled
        self.last_batch_size = len(live)
        if not live:
            return
        started = time.perf_counter()
        self.running = [future for _, future in live]
        try:
            results = await self._call([item for item, _ in live])
        except Exception as err:
            if len(live) == 1:
                _fail(live[0][1], err)
                return
            # One bad query must not fail the queries batched with it: run them one at a time,
            # so each gets its own answer or its own error.
            log.warning(
                "a batch of %d failed (%s: %s); running its queries one by one",
                len(live), type(err).__name__, err,
            )  # fmt: skip
            await self._run_alone(live)
            return
        finally:
            self.running = []
        if self.observe is not None:
            self.observe(len(live), time.perf_counter() - started)
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _call(self, items: list[Item]) -> Sequence[Result]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.run_batch, items)

    async def _run_alone(self, live: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        for item, future in live:
            if future.done():
                continue
            try:
                (result,) = await self._call([item])
            except Exception as err:
                _fail(future, err)
            else:
                future.set_result(result)


def _fail(future: asyncio.Future, err: Exception) -> None:
    """The request's own error (the route turns it into a response; the worker lives on)."""
    if not future.done():
        future.set_exception(err)
