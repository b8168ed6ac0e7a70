"""What a search does in the search pool, on one leased index version: search it (or read a text
ranking's best hits), group the hits by study or patient, fill the chosen groups and describe
them as cards (cards.py). The Searcher (searcher.py) calls it; SearchOptions and Found (query.py) are
what goes in and comes out, with the stages' Timings added up on the way."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from index.errors import FilterError
from index.read.hybrid import TextRanking
from index.read.limits import MAX_FETCH
from index.read.search import OVERFETCH, Hit, widening
from index.read.store import IndexStore
from index.read.timings import DESCRIBE, GROUPING, REPORTS, Timings
from service.errors import InvalidQuery, NotFound

from .cards import describe_groups
from .grouping import HitGroup, fill_groups, group_hits
from .query import Found, SearchOptions


def find(
    store: IndexStore,
    space: str,
    vector: np.ndarray,
    options: SearchOptions,
    exclude: Collection[int],
    ranking: TextRanking | None = None,
    viewer_url: str | None = None,
    timings: Timings | None = None,
    truncated: bool = False,
) -> Found:
    """Search (or read a text ranking's best hits), group and describe. Grouped searches
    read more hits (index.read.search.widening) until k groups are found, the index runs out,
    or MAX_FETCH hits have been read."""
    timings = timings or Timings()

    def read(fetch: int) -> tuple[list[HitGroup], dict, bool]:
        if ranking is None:
            hits = search(store, space, vector, fetch, options, exclude, timings)
        else:
            with timings.stage(REPORTS):
                hits = ranking.top(fetch)
        exhausted = len(hits) < fetch
        with timings.stage(GROUPING):
            if options.min_score is not None:
                kept = [hit for hit in hits if hit.score >= options.min_score]
                exhausted = exhausted or len(kept) < len(hits)
                hits = kept
            rows = store.get_many([hit.id for hit in hits])
            return group_hits(hits, rows, options.group_by), rows, exhausted

    first = options.k if options.group_by == "none" else options.k * OVERFETCH
    groups, rows, _ = widening(
        read, first, max(first, MAX_FETCH), lambda read: len(read[0]) >= options.k or read[2]
    )
    chosen = groups[: options.k]
    if options.group_by != "none":
        fill(store, space, vector, chosen, options, exclude, ranking, timings)
    with timings.stage(DESCRIBE):
        results = describe_groups(chosen, rows, options.group_by, viewer_url)
    mode = ranking.mode if ranking is not None else "image"
    return Found(results, store.version, store.fingerprint, truncated, mode, timings.ms())


def fill(
    store: IndexStore,
    space: str,
    vector: np.ndarray,
    groups: list[HitGroup],
    options: SearchOptions,
    exclude: Collection[int],
    ranking: TextRanking | None = None,
    timings: Timings | None = None,
) -> None:
    """Complete the chosen groups with every member that passes the filters, scored exactly
    (one SQL query per grouping field, one matrix product; a text ranking's fused score)."""
    keys: dict[str, set[str]] = {}
    for group in groups:
        if group.key is not None and group.named_by is not None:
            keys.setdefault(group.named_by, set()).add(group.key)
    members: dict[tuple[str, str], list[int]] = {}
    timings = timings or Timings()
    for name, wanted in keys.items():
        found = store.group_members(name, wanted, options.filters, options.keywords, timings)
        members.update({(name, key): ids for key, ids in found.items()})
    with timings.stage(GROUPING):
        skip = set(exclude)
        every = sorted({i for ids in members.values() for i in ids if i not in skip})
        if not every:
            return
        if ranking is not None:
            scored = {hit.id: hit.score for hit in ranking.score(np.asarray(every))}
        else:
            scores = store.similarity(space, vector, every)
            scored = dict(zip(every, scores.tolist(), strict=True))
        fill_groups(groups, members, scored, options.min_score)


def search(
    store: IndexStore,
    space: str,
    vector: np.ndarray,
    k: int,
    options: SearchOptions,
    exclude: Collection[int],
    timings: Timings | None = None,
) -> list[Hit]:
    try:
        return store.search(space, vector, k, options.filters, options.keywords, exclude, timings)
    except FilterError as err:
        raise InvalidQuery("invalid_filters", str(err)) from err


def stored_vectors(store: IndexStore, ids: list[int], space: str) -> np.ndarray:
    try:
        return store.vectors_of(ids, space)
    except KeyError as err:
        raise NotFound("unknown_id", err.args[0]) from err


def row_in(store: IndexStore, image_id: int) -> dict:
    row = store.get(image_id)
    if row is None:
        raise NotFound(
            "unknown_id", f"no image with id {image_id} in index version {store.version}"
        )
    return row
