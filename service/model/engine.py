"""The model behind the service: decoding, preprocessing, micro-batched encoder calls.

Every encoder call runs in the thread that loaded the model (torch uses its own intra-op threads
inside it), fed by two micro-batchers, one per modality. Uploads are decoded and preprocessed in a
separate pool of one thread per CPU (one torch thread each), in parallel with the model; at most
`max_concurrent_decodes` of them decode at once (decoding a large image takes memory), however
many uploads arrive together. Index searches run in the Searcher's pool (service.search.searcher).
Heat-maps (GET /v1/explain) never run on the model thread: they have their own worker
(service.model.explain_worker), so that a query never waits behind one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from convirt.bundle import Bundle
from convirt.decode_budget import trim_heap
from convirt.imageio import load_image
from convirt.inference import Embedder
from convirt.quantize import load_int8, release_text_tower
from index.read.timings import ENCODE, QUEUE, Timings
from service.metrics import Metrics
from service.settings import Settings

from .batching import MicroBatcher
from .region import Box, crop_to_box
from .threads import decode_pool

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TextVector:
    vector: np.ndarray  # joint space, L2-normalised
    truncated: bool  # the text ran past the encoder's token limit
    seconds: float = 0.0  # the encoder call it was batched into


@dataclass(frozen=True)
class ImageVectors:
    encoder: np.ndarray  # h/|h|
    joint: np.ndarray  # v/|v|
    seconds: float  # the encoder call it was batched into


class Engine:
    def __init__(
        self,
        bundle: Bundle,
        model_thread: ThreadPoolExecutor,
        settings: Settings,
        metrics: Metrics,
    ):
        """model_thread: the single thread that loaded the bundle (service.model.loading); with
        settings.quantize "int8" query texts go through the bundle's int8 encoder
        (convirt.quantize), loaded in that thread with as many intra-op threads as torch has,
        and the fp32 text encoder it replaces is let go."""
        text_encoder = None
        if settings.quantize == "int8":
            load = partial(load_int8, bundle, build_missing=True)
            text_encoder = model_thread.submit(load).result()
            release_text_tower(bundle)
            trim_heap()
        self.query_encoder = text_encoder.name if text_encoder else "fp32"
        self.embedder = Embedder(
            bundle, settings.device, batch_size=settings.max_batch, text_encoder=text_encoder
        )
        self.executor = model_thread
        self.decoders = decode_pool()
        self.decode_slots = asyncio.Semaphore(settings.max_concurrent_decodes)
        window_s = settings.batch_window_ms / 1000
        self.texts: MicroBatcher[str, TextVector] = MicroBatcher(
            self._embed_texts,
            self.executor,
            window_s,
            settings.max_batch,
            partial(metrics.observe_batch, "text"),
        )
        self.images: MicroBatcher[torch.Tensor, ImageVectors] = MicroBatcher(
            self._embed_pixels,
            self.executor,
            window_s,
            settings.max_image_batch,
            partial(metrics.observe_batch, "image"),
        )

    @property
    def fingerprint(self) -> str:
        return self.embedder.bundle.fingerprint

    @property
    def max_tokens(self) -> int:
        return self.embedder.max_tokens

    def start(self) -> None:
        self.texts.start()
        self.images.start()

    async def stop(self) -> None:
        await self.texts.stop()
        await self.images.stop()
        for pool in (self.executor, self.decoders):
            pool.shutdown(wait=True, cancel_futures=True)

    def warm_up(self) -> None:
        """One call of each encoder in the model thread, so the first request does not pay for
        lazy initialisation."""
        size = self.embedder.bundle.config.image_size
        pixels = self.decoders.submit(self.embedder.preprocess, Image.new("L", (size, size)))
        self.executor.submit(self._embed_texts, ["warm up"]).result()
        self.executor.submit(self._embed_pixels, [pixels.result()]).result()

    async def embed_text(self, text: str, timings: Timings | None = None) -> TextVector:
        """`timings`: where the wait for the model thread and the encoder call are added."""
        asked = time.perf_counter()
        embedded = await self.texts.submit(text)
        _waited(timings, asked, embedded.seconds)
        return embedded

    async def embed_image(self, pixels: torch.Tensor, timings: Timings | None = None) -> np.ndarray:
        """Encoder-space vector h/|h| of one preprocessed image (the space the index searches)."""
        asked = time.perf_counter()
        embedded = await self.images.submit(pixels)
        _waited(timings, asked, embedded.seconds)
        return embedded.encoder

    async def embed_image_vectors(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(h/|h| in the encoder space, v/|v| in the joint space) of one preprocessed image."""
        embedded = await self.images.submit(pixels)
        return embedded.encoder, embedded.joint

    async def prepare_image(
        self, data: bytes | Path, box: Box | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Decode an upload (or an indexed file), crop it to `box`, preprocess it; with the size
        of the decoded image. Runs in the decode pool.

        Raises convirt.imageio.ImageDecodeError (ImageTooLargeError for decompression bombs),
        ValueError for a box too small. At most settings.max_concurrent_decodes run at once; the
        others wait here, off the pool.
        """
        async with self.decode_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decoders, self._prepare_image, data, box)

    async def decode(self, work: Callable[..., T], *args: Any) -> T:
        """work(*args) in the decode pool under the same bound as uploads (another decode, such
        as the viewer's pixels: convirt.viewpixels)."""
        async with self.decode_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decoders, work, *args)

    def _prepare_image(
        self, data: bytes | Path, box: Box | None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        image = load_image(data)
        size = image.size
        if box is not None:
            image = crop_to_box(image, box)
        return self.embedder.preprocess(image), size

    def _embed_texts(self, texts: list[str]) -> list[TextVector]:
        started = time.perf_counter()
        embedded = self.embedder.embed_texts(texts)
        seconds = time.perf_counter() - started
        return [
            TextVector(vector, truncated, seconds)
            for vector, truncated in zip(embedded.vectors, embedded.truncated, strict=True)
        ]

    def _embed_pixels(self, tensors: list[torch.Tensor]) -> list[ImageVectors]:
        started = time.perf_counter()
        encoder, joint = self.embedder.embed_pixels(torch.stack(tensors))
        seconds = time.perf_counter() - started
        return [ImageVectors(h, v, seconds) for h, v in zip(encoder, joint, strict=True)]


def _waited(timings: Timings | None, asked: float, seconds: float) -> None:
    """A query's time from asking to its answer, as the encoder call and the wait before it."""
    if timings is not None:
        timings.add(QUEUE, time.perf_counter() - asked - seconds)
        timings.add(ENCODE, seconds)
