"""The one owner of search: text, image, region, similar, refine, facets and explanations.

A query goes route → Searcher → store → hits → response items, and only the answer goes back to
the route. The Searcher embeds the query with the engine (the model thread, micro-batched), then
leases the served index version and, in one hop to its own pool (faiss single-threaded, see
service.threads), searches it, groups the hits by study or patient and describes them. Client
mistakes it finds on the way (a filter the index cannot run, an unknown id, a bad image) are
raised as ApiErrors, so routes only translate HTTP to a call and the answer back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from convirt.explain import HeatMap
from convirt.imageio import ImageDecodeError, ImageTooLargeError
from index.errors import FilterError
from index.hybrid import TextRanking
from index.store import Facet, Hit, IndexStore, Keywords
from index.suggest import CASES, Suggestion, suggest

from . import audit
from .engine import Engine
from .errors import ApiError
from .explain_worker import HeatMapWorker
from .explainer import Explainer, query_key
from .feedback import Weights, rocchio
from .grouping import HitGroup, fill_groups, group_hits, group_key
from .pacs import PacsFetcher
from .results import describe_groups
from .schemas import RefineQuery, SearchControls
from .settings import Settings
from .stores import StoreSlot
from .threads import search_pool
from .uploads import Box

T = TypeVar("T")
GROUP_OVERFETCH = 4  # grouped searches read k * 4 hits first, then 4 times more while short
MAX_FETCH = 2_000  # ...up to this many: a bound on the work one grouped query may cause


@dataclass(frozen=True)
class SearchOptions:
    k: int = 10
    filters: Mapping[str, Any] = field(default_factory=dict)
    keywords: Keywords | None = None
    group_by: str = "study"
    min_score: float | None = None

    @classmethod
    def of(cls, controls: SearchControls) -> SearchOptions:
        keywords = None
        if controls.must or controls.must_not:
            keywords = Keywords(tuple(controls.must), tuple(controls.must_not))
        return cls(controls.k, controls.filters, keywords, controls.group_by, controls.min_score)


@dataclass(frozen=True)
class Found:
    results: list
    index_version: str
    model_fingerprint: str
    truncated: bool = False
    mode: str = "image"  # text queries: what ranked them (index.hybrid)


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
    ):
        self.engine = engine
        self.stores = stores
        self.settings = settings
        self.pacs = pacs or PacsFetcher(settings)
        self.pool = search_pool()
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

    def close(self) -> None:
        self.explainer.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- queries -----------------------------------------------------------------------------------

    async def text(
        self,
        text: str,
        options: SearchOptions,
        root: str,
        mode: str | None = None,
        fusion: str = "weighted",
    ) -> Found:
        """Images matching a report sentence: by the image, its report, or both (index.hybrid;
        mode None: hybrid where the index holds report sentences, else the image alone)."""
        audit.note_query(text)
        self._check_text(text)
        embedded = await self.engine.embed_text(text)

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
                    )
                except FilterError as err:
                    raise ApiError(422, "invalid_filters", str(err)) from err
            return self._find(store, "joint", embedded.vector, options, root, (), ranking)

        found = await self._on_store(find)
        return replace(found, truncated=embedded.truncated)

    async def image(
        self, data: bytes | Path, options: SearchOptions, root: str, box: Box | None = None
    ) -> Found:
        """Images nearest to an uploaded image (or the `box` region of it), in the encoder space."""
        if isinstance(data, bytes):
            audit.note_upload(data)
        pixels, _size = await self._prepare(data, box)
        vector = await self.engine.embed_image(pixels)
        return await self._on_store(self._find, "encoder", vector, options, root, ())

    async def similar(
        self, image_id: int, options: SearchOptions, root: str, box: Box | None = None
    ) -> Found:
        """Images nearest to an indexed one, itself left out; or to a region of it."""
        audit.note_image(image_id)
        if box is not None:
            return await self.image(await self._indexed_path(image_id), options, root, box)

        def find(store: IndexStore) -> Found:
            vector = self._stored_vectors(store, [image_id], "encoder")[0]
            return self._find(store, "encoder", vector, options, root, {image_id})

        return await self._on_store(find)

    async def refine(self, query: RefineQuery, root: str) -> Found:
        """The query moved toward liked results and away from disliked ones (service.feedback).

        A text query refines in the joint space; an indexed image, or liked examples alone, in
        the encoder space."""
        if query.text is None and query.image_id is None and not query.liked:
            raise ApiError(
                422, "nothing_to_refine", "give text or image_id, or at least one liked image"
            )
        audit.note_query(query.text)
        audit.note_image(query.image_id)
        options = SearchOptions.of(query)
        space = "joint" if query.text is not None else "encoder"
        start = None
        if query.text is not None:
            self._check_text(query.text)
            start = (await self.engine.embed_text(query.text)).vector
        liked = [int(i) for i in query.liked]
        disliked = [int(i) for i in query.disliked]
        weights = Weights(query.weights.query, query.weights.liked, query.weights.disliked)

        def find(store: IndexStore) -> Found:
            origin = start
            if query.image_id is not None:
                origin = self._stored_vectors(store, [int(query.image_id)], space)[0]
            try:
                vector = rocchio(
                    origin,
                    self._stored_vectors(store, liked, space),
                    self._stored_vectors(store, disliked, space),
                    weights,
                )
            except ValueError as err:
                raise ApiError(422, "nothing_to_refine", str(err)) from err
            exclude = set(disliked) if query.exclude_disliked else set()
            if query.image_id is not None:
                exclude.add(int(query.image_id))
            return self._find(store, space, vector, options, root, exclude)

        return await self._on_store(find)

    async def suggest(
        self, data: bytes | None, image_id: int | None, count: int
    ) -> tuple[Suggestion, str]:
        """What the reports of similar cases said of an upload or an indexed image (index.suggest):
        a suggestion from retrieved text, with the index version it was read from. An indexed
        image's own study is left out of its similar cases."""
        if (data is None) == (image_id is None):
            raise ApiError(422, "invalid_query", "give either an image file or image_id, not both")
        vectors = None
        if data is not None:
            audit.note_upload(data)
            pixels, _size = await self._prepare(data)
            vectors = await self.engine.embed_image_vectors(pixels)
        else:
            audit.note_image(image_id)

        def work(store: IndexStore) -> tuple[Suggestion, str]:
            if store.sentences is None:
                raise ApiError(
                    409,
                    "no_report_sentences",
                    f"index version {store.version} was built before report sentences were "
                    "indexed: rebuild it (`convirt index build`) to suggest from its reports",
                )
            exclude: set[int] = set()
            if image_id is not None:
                row = self._row_in(store, image_id)
                encoder = self._stored_vectors(store, [image_id], "encoder")[0]
                joint = self._stored_vectors(store, [image_id], "joint")[0]
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
        text: str | None = None,
        query_id: int | None = None,
        charge: Callable[[], None] = lambda: None,
    ) -> tuple[Explanation, bool]:
        """Where in the image its similarity to the query comes from (convirt.explain), and
        whether the map came from the cache. Computed in the heat-map worker, off the model
        thread, under the explainer's queue bound; `charge` is called before a map is computed
        (service.explainer: the caller's rate-limit cost)."""
        if (text is None) == (query_id is None):
            raise ApiError(422, "invalid_query", "give either text or query_id, not both")
        audit.note_image(image_id)
        audit.note_query(text)
        audit.note_image(query_id)
        if text is not None:
            self._check_text(text)
        asked = query_key(text, query_id)
        return await self.explainer.explain(
            (self.stores.current.version, image_id, asked),
            partial(self._explain, image_id, text, query_id),
            charge,
            lambda found: (found.index_version, image_id, asked),
        )

    async def _explain(self, image_id: int, text: str | None, query_id: int | None) -> Explanation:
        """The map itself: the image read (from a PACS too), the query embedded (a text on the
        model thread, micro-batched as any text query), the map in the heat-map worker."""

        def locate(store: IndexStore) -> tuple[dict, np.ndarray | None, str]:
            """The image's row, the query image's vector, the version both come from."""
            row = self._row_in(store, image_id)
            stored = None
            if query_id is not None:
                stored = self._stored_vectors(store, [query_id], "encoder")[0]
            return row, stored, store.version

        row, stored, version = await self._on_store(locate)
        path = await self.pacs.file(row)
        if text is not None:
            space, query = "joint", (await self.engine.embed_text(text)).vector
        else:
            space, query = "encoder", stored
        pixels, size = await self._prepare(path)
        heat_map = await self.explainer.heat_map(pixels, query, space, size)
        return Explanation(heat_map, space, version)

    # -- in the search pool ------------------------------------------------------------------------

    def _find(
        self,
        store: IndexStore,
        space: str,
        vector: np.ndarray,
        options: SearchOptions,
        root: str,
        exclude: Collection[int],
        ranking: TextRanking | None = None,
    ) -> Found:
        """Search (or read a text ranking's best hits), group and describe. Grouped searches
        read more hits until k groups are found, the index runs out, or MAX_FETCH hits have
        been read."""
        fetch = options.k if options.group_by == "none" else options.k * GROUP_OVERFETCH
        while True:
            if ranking is None:
                hits = self._search(store, space, vector, fetch, options, exclude)
            else:
                hits = ranking.top(fetch)
            exhausted = len(hits) < fetch
            if options.min_score is not None:
                kept = [hit for hit in hits if hit.score >= options.min_score]
                exhausted = exhausted or len(kept) < len(hits)
                hits = kept
            rows = store.get_many([hit.id for hit in hits])
            groups = group_hits(hits, rows, options.group_by)
            if len(groups) >= options.k or exhausted or fetch >= MAX_FETCH:
                break
            fetch = min(fetch * GROUP_OVERFETCH, MAX_FETCH)
        chosen = groups[: options.k]
        if options.group_by != "none":
            self._fill(store, space, vector, chosen, options, exclude, ranking)
        results = describe_groups(chosen, rows, root, options.group_by, self.settings.viewer_url)
        mode = ranking.mode if ranking is not None else "image"
        return Found(results, store.version, store.fingerprint, mode=mode)

    @staticmethod
    def _fill(
        store: IndexStore,
        space: str,
        vector: np.ndarray,
        groups: list[HitGroup],
        options: SearchOptions,
        exclude: Collection[int],
        ranking: TextRanking | None = None,
    ) -> None:
        """Complete the chosen groups with every member that passes the filters, scored exactly
        (one SQL query per grouping field, one matrix product; a text ranking's fused score)."""
        keys: dict[str, set[str]] = {}
        for group in groups:
            if group.key is not None and group.named_by is not None:
                keys.setdefault(group.named_by, set()).add(group.key)
        members: dict[tuple[str, str], list[int]] = {}
        for name, wanted in keys.items():
            found = store.group_members(name, wanted, options.filters, options.keywords)
            members.update({(name, key): ids for key, ids in found.items()})
        skip = set(exclude)
        every = sorted({i for ids in members.values() for i in ids if i not in skip})
        if not every:
            return
        if ranking is not None:
            scored = {hit.id: hit.score for hit in ranking.score(np.asarray(every))}
            fill_groups(groups, members, scored, options.min_score)
            return
        query = vector / max(float(np.linalg.norm(vector)), 1e-12)
        scores = store.vectors_of(every, space) @ query.astype(np.float32)
        fill_groups(
            groups, members, dict(zip(every, scores.tolist(), strict=True)), options.min_score
        )

    @staticmethod
    def _search(
        store: IndexStore,
        space: str,
        vector: np.ndarray,
        k: int,
        options: SearchOptions,
        exclude: Collection[int],
    ) -> list[Hit]:
        try:
            return store.search(space, vector, k, options.filters, options.keywords, exclude)
        except FilterError as err:
            raise ApiError(422, "invalid_filters", str(err)) from err

    @staticmethod
    def _stored_vectors(store: IndexStore, ids: list[int], space: str) -> np.ndarray:
        try:
            return store.vectors_of(ids, space)
        except KeyError as err:
            raise ApiError(404, "unknown_id", err.args[0]) from err

    # -- helpers -----------------------------------------------------------------------------------

    async def _on_store(self, work: Callable[..., T], *args: Any) -> T:
        """work(store, *args) in the search pool, on the version served when it was called; the
        results it finds go into the request's audit record."""
        with self.stores.lease() as store:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self.pool, work, store, *args)
        if isinstance(done, Found):
            audit.note_results(done.results)
        return done

    async def _indexed_path(self, image_id: int) -> Path:
        """The file of an indexed image; one a PACS holds is fetched in the PACS pool, under its
        deadline (service.pacs: a network wait in the search pool, or the shared one, would hold
        up every search)."""
        row = await self._on_store(self._row_in, image_id)
        return await self.pacs.file(row)

    @staticmethod
    def _row_in(store: IndexStore, image_id: int) -> dict:
        row = store.get(image_id)
        if row is None:
            raise ApiError(
                404, "unknown_id", f"no image with id {image_id} in index version {store.version}"
            )
        return row

    async def _prepare(
        self, data: bytes | Path, box: Box | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        try:
            return await self.engine.prepare_image(data, box)
        except ImageTooLargeError as err:
            raise ApiError(413, "too_many_pixels", str(err)) from err
        except ImageDecodeError as err:
            raise ApiError(422, "undecodable_image", str(err)) from err
        except ValueError as err:  # a box too small to search by
            raise ApiError(422, "invalid_box", str(err)) from err

    def _check_text(self, text: str) -> None:
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise ApiError(
                422,
                "text_too_long",
                f"text has {len(text):,} characters; the limit is {limit:,} (and the encoder "
                f"reads only its first {self.engine.max_tokens} tokens)",
            )


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
