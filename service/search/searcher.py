"""The one owner of search: text, image, region, similar, refine, facets and explanations.

A query goes route → Searcher → store → hits → cards, and only the answer goes back to the
route. The Searcher embeds the query with the engine (the model thread, micro-batched), then
leases the served index version and, in one hop to its own pool (faiss single-threaded, see
service.model.threads), searches it, groups the hits by study or patient and describes them as
cards (find.py). It takes plain options (query.py) and knows no HTTP: client mistakes it finds on
the way (a filter the index cannot run, an unknown id, a bad image) are raised as
service.errors kinds, which the routes answer with their HTTP status; what a request asked and
found is noted in its audit record by the routes (service/api/), not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from convirt.explain import HeatMap
from convirt.imageio import ImageDecodeError, ImageTooLargeError
from convirt.viewpixels import ViewPixels, view_pixels
from index.errors import FilterError
from index.read.facets import Facet
from index.read.store import IndexStore
from index.read.suggest import CASES, Suggestion, suggest
from index.read.timings import DECODE, Timings
from service.errors import Conflict, InvalidQuery, TooLarge
from service.metrics import Metrics
from service.model.engine import Engine
from service.model.explain_worker import HeatMapWorker
from service.model.explainer import Explainer, query_key
from service.model.region import Box
from service.model.threads import search_pool
from service.settings import Settings

from . import calibration
from .feedback import rocchio
from .find import find, row_in, stored_vectors
from .grouping import group_key
from .kept import KeptUpload
from .pacs import PacsFetcher
from .query import Found, Refinement, SearchOptions
from .scales import Scales
from .stores import StoreSlot

T = TypeVar("T")


@dataclass(frozen=True)
class Explanation:
    heat_map: HeatMap
    space: str
    index_version: str


class Searcher:
    def __init__(
        self,
        engine: Engine,
        stores: StoreSlot,
        settings: Settings,
        pacs: PacsFetcher | None = None,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.stores = stores
        self.settings = settings
        self.pacs = pacs or PacsFetcher(settings)
        self.metrics = metrics  # each search's stages go to its histograms
        self.pool = search_pool()
        # find.find (run in the pool) with this service's PACS viewer link
        self._find = partial(find, viewer_url=settings.viewer_url)
        worker = HeatMapWorker(
            engine.embedder,
            settings.explain_worker,
            settings.explain_concurrency,
            settings.explain_nice,
        )
        self.explainer: Explainer[Explanation] = Explainer(
            worker,
            settings.explain_concurrency,
            settings.explain_queue,
            settings.explain_cache_entries,
        )
        self.scales = Scales(stores)  # what scores mean, per version, in the background
        self.scales.refresh()

    def close(self) -> None:
        self.scales.close()
        self.explainer.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- queries -----------------------------------------------------------------------------------

    async def text(
        self,
        text: str,
        options: SearchOptions,
        mode: str | None = None,
        fusion: str = "weighted",
    ) -> Found:
        """Images matching a report sentence: by the image, its report, or both (index.read.hybrid;
        mode None: hybrid where the index holds report sentences, else the image alone)."""
        self._check_text(text)
        timings = Timings()
        embedded = await self.engine.embed_text(text, timings)

        def find(store: IndexStore) -> Found:
            ranking = None
            if mode != "image":
                try:
                    ranking = store.rank_text(
                        embedded.vector,
                        text,
                        options.k,
                        options.filters,
                        options.keywords,
                        mode=mode or "hybrid",
                        fusion=fusion,
                        timings=timings,
                    )
                except FilterError as err:
                    raise InvalidQuery("invalid_filters", str(err)) from err
            vector, truncated = embedded.vector, embedded.truncated
            return self._find(
                store,
                "joint",
                vector,
                options,
                (),
                ranking,
                timings=timings,
                truncated=truncated,
            )

        found = await self._on_store(find)
        return self._scaled(found, calibration.text_kind(found.mode, fusion))

    async def image(
        self,
        data: bytes | Path,
        options: SearchOptions,
        box: Box | None = None,
        vector: np.ndarray | None = None,
    ) -> Found:
        """Images nearest to an uploaded image (or the `box` region of it), in the encoder space;
        `vector`: the query's (the whole image's or the region's), when known (a kept upload),
        not embedded again. The answer holds the vector searched by."""
        timings = Timings()
        if vector is None:
            with timings.stage(DECODE):
                pixels, _size = await self._prepare(data, box)
            vector = await self.engine.embed_image(pixels, timings)

        def find(store: IndexStore) -> Found:
            return self._find(store, "encoder", vector, options, (), timings=timings)

        found = await self._on_store(find)
        return replace(self._scaled(found, calibration.IMAGE), vector=vector)

    async def upload_vector(self, upload: KeptUpload, box: Box | None = None) -> np.ndarray:
        """The encoder vector of a kept upload's whole image, or of its `box` region, embedded
        once (kept with the upload)."""
        known = upload.vector if box is None else upload.regions.get(box)
        if known is not None:
            return known
        vector = await self.engine.embed_image((await self._prepare(upload.data, box))[0])
        if box is None:
            upload.vector = vector
        else:
            upload.keep_region(box, vector)
        return vector

    async def similar(self, image_id: int, options: SearchOptions, box: Box | None = None) -> Found:
        """Images nearest to an indexed one, itself left out; or to a region of it."""
        if box is not None:
            return await self.image(await self._indexed_path(image_id), options, box)

        def find(store: IndexStore) -> Found:
            vector = stored_vectors(store, [image_id], "encoder")[0]
            return self._find(store, "encoder", vector, options, {image_id}, timings=Timings())

        return self._scaled(await self._on_store(find), calibration.IMAGE)

    async def refine(self, query: Refinement, options: SearchOptions) -> Found:
        """The query moved toward liked results and away from disliked ones (service.search.feedback).

        A text query refines in the joint space; an indexed image (or the `box` region of it),
        an upload (its vector given, a region's where one was drawn), or liked examples alone, in
        the encoder space."""
        queries = (query.text, query.image_id, query.upload)
        if all(part is None for part in queries) and not query.liked:
            raise InvalidQuery(
                "nothing_to_refine", "give text, image_id or upload_id, or at least one liked image"
            )
        space = "joint" if query.text is not None else "encoder"
        start = None
        timings = Timings()
        if query.text is not None:
            self._check_text(query.text)
            start = (await self.engine.embed_text(query.text, timings)).vector
        region = None
        if query.image_id is not None and query.box is not None:
            with timings.stage(DECODE):
                pixels, _size = await self._prepare(
                    await self._indexed_path(query.image_id), query.box
                )
            region = await self.engine.embed_image(pixels, timings)
        liked, disliked = list(query.liked), list(query.disliked)

        def find(store: IndexStore) -> Found:
            origin = start if query.upload is None else query.upload
            if query.image_id is not None:
                origin = (
                    region
                    if region is not None
                    else stored_vectors(store, [query.image_id], space)[0]
                )
            try:
                vector = rocchio(
                    origin,
                    stored_vectors(store, liked, space),
                    stored_vectors(store, disliked, space),
                    query.weights,
                )
            except ValueError as err:
                raise InvalidQuery("nothing_to_refine", str(err)) from err
            exclude = set(disliked) if query.exclude_disliked else set()
            if query.image_id is not None:
                exclude.add(query.image_id)
            return self._find(store, space, vector, options, exclude, timings=timings)

        kind = calibration.TEXT_DENSE if space == "joint" else calibration.IMAGE
        return self._scaled(await self._on_store(find), kind)

    async def suggest(self, image: bytes | int, count: int) -> tuple[Suggestion, str]:
        """What the reports of similar cases said of an image, uploaded (bytes) or indexed (its
        id) (index.read.suggest): a suggestion from retrieved text, with the index version it
        was read from. An indexed image's own study is left out of its similar cases."""
        image_id = image if isinstance(image, int) else None
        vectors = None
        if isinstance(image, bytes):
            pixels, _size = await self._prepare(image)
            vectors = await self.engine.embed_image_vectors(pixels)

        def work(store: IndexStore) -> tuple[Suggestion, str]:
            if store.sentences is None:
                raise Conflict(
                    "no_report_sentences",
                    f"index version {store.version} was built before report sentences were "
                    "indexed: rebuild it (`convirt index build`) to suggest from its reports",
                )
            exclude: set[int] = set()
            if image_id is not None:
                row = row_in(store, image_id)
                encoder = stored_vectors(store, [image_id], "encoder")[0]
                joint = stored_vectors(store, [image_id], "joint")[0]
                exclude = {image_id, *self._study_of(store, row)}
            else:
                encoder, joint = vectors
            hits = store.search("encoder", encoder, CASES, exclude=exclude)
            cases = [(hit.id, hit.score) for hit in hits]
            return suggest(store.sentences, joint, cases, count), store.version

        return await self._on_store(work)

    @staticmethod
    def _study_of(store: IndexStore, row: Mapping[str, Any]) -> list[int]:
        """The ids of the other images of a row's study (none where no field names one)."""
        key = group_key(row, "study")
        if key is None:
            return []
        return store.group_members(key[0], {key[1]}).get(key[1], [])

    async def facets(self) -> tuple[str, int, list[Facet]]:
        """(index version, image count, facets) of the served version."""
        return await self._on_store(lambda store: (store.version, store.count, store.facets()))

    async def explain(
        self,
        image_id: int,
        query: str | int | KeptUpload,
        charge: Callable[[], None] = lambda: None,
    ) -> tuple[Explanation, bool]:
        """Where in the image its similarity to the query (a text, an indexed image's id or a
        kept upload) comes from (convirt.explain), and whether the map came from the cache.
        Computed in the heat-map worker, off the model thread, under the explainer's queue
        bound; `charge` is called before a map is computed (service.model.explainer: the
        caller's rate-limit cost)."""
        text = query if isinstance(query, str) else None
        query_id = query if isinstance(query, int) else None
        upload = query if isinstance(query, KeptUpload) else None
        if text is not None:
            self._check_text(text)
        asked = query_key(text, query_id, upload.id if upload is not None else None)
        return await self.explainer.explain(
            (self.stores.current.version, image_id, asked),
            partial(self._explain, image_id, text, query_id, upload),
            charge,
            lambda found: (found.index_version, image_id, asked),
        )

    async def _explain(
        self,
        image_id: int,
        text: str | None,
        query_id: int | None,
        upload: KeptUpload | None = None,
    ) -> Explanation:
        """The map itself: the image read (from a PACS too), the query embedded (a text on the
        model thread, micro-batched as any text query), the map in the heat-map worker."""

        def locate(store: IndexStore) -> tuple[dict, np.ndarray | None, str]:
            """The image's row, the query image's vector, the version both come from."""
            row = row_in(store, image_id)
            stored = None
            if query_id is not None:
                stored = stored_vectors(store, [query_id], "encoder")[0]
            return row, stored, store.version

        row, stored, version = await self._on_store(locate)
        path = await self.pacs.file(row)
        if text is not None:
            space, query = "joint", (await self.engine.embed_text(text)).vector
        elif upload is not None:
            space, query = "encoder", await self.upload_vector(upload)
        else:
            space, query = "encoder", stored
        pixels, size = await self._prepare(path)
        heat_map = await self.explainer.heat_map(pixels, query, space, size)
        return Explanation(heat_map, space, version)

    async def pixels(self, image: int | bytes) -> ViewPixels:
        """An indexed image (by id; a PACS's fetched) or an upload's bytes, decoded for the viewer
        (convirt.viewpixels), in the decode pool under the decode bound."""
        source = await self._indexed_path(image) if isinstance(image, int) else image
        with refused_decodes():
            return await self.engine.decode(view_pixels, source)

    # -- helpers -----------------------------------------------------------------------------------

    def _scaled(self, found: Found, kind: str) -> Found:
        """The answer with the scale of its kind on its version (None while it is calibrated)."""
        return replace(found, scale=self.scales.of(found.index_version, kind))

    async def _on_store(self, work: Callable[..., T], *args: Any) -> T:
        """work(store, *args) in the search pool, on the version served when it was called; a
        search's stages go to the histograms of /metrics."""
        with self.stores.lease() as store:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self.pool, work, store, *args)
        if isinstance(done, Found) and self.metrics is not None:
            self.metrics.observe_stages(done.timings)
        return done

    async def _indexed_path(self, image_id: int) -> Path:
        """The file of an indexed image; one a PACS holds is fetched in the PACS pool, under its
        deadline (service.search.pacs: a network wait in the search pool, or the shared one, would hold
        up every search)."""
        row = await self._on_store(row_in, image_id)
        return await self.pacs.file(row)

    async def _prepare(
        self, data: bytes | Path, box: Box | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        with refused_decodes():
            try:
                return await self.engine.prepare_image(data, box)
            except ImageDecodeError:
                raise
            except ValueError as err:  # a box too small to search by
                raise InvalidQuery("invalid_box", str(err)) from err

    def _check_text(self, text: str) -> None:
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise InvalidQuery(
                "text_too_long",
                f"text has {len(text):,} characters; the limit is {limit:,} (and the encoder "
                f"reads only its first {self.engine.max_tokens} tokens)",
            )


@contextmanager
def refused_decodes() -> Iterator[None]:
    """An image that cannot be decoded, as the caller's mistake (413 or 422)."""
    try:
        yield
    except ImageTooLargeError as err:
        raise TooLarge("too_many_pixels", str(err)) from err
    except ImageDecodeError as err:
        raise InvalidQuery("undecodable_image", str(err)) from err
