"""Compaction: segments merged into one, deleted rows dropped (`convirt index compact`, and the
policy every add, sync and remove runs once it has published).

Every add writes a segment, so without merging a busy archive would be served from thousands of
them (a search visits each). The policy, Lucene's tiered merge policy in miniature:

- a segment whose deleted rows exceed DELETED_SHARE (20%) of its rows is rewritten without them;
- when a version lists more than MAX_SEGMENTS (8), the smallest segments are merged into one,
  MERGE_AT_ONCE (4) or more at a time (as many as it takes to get back to 8).

Merging the smallest first keeps an add cheap: a 1% add never rewrites the big segment (it is
the largest, merged only once at least MAX_SEGMENTS - MERGE_AT_ONCE + 1 segments at least as
large exist), and each image is rewritten about log4(archive / add) times in its life. Explicit
`convirt index compact` merges every segment into one (before a benchmark, a backup, a reindex).
A compaction is a write like any other: a new segment, then a version listing it, atomically; the
old versions and their segments stay readable until pruned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .. import layout
from ..errors import IndexLockedError
from . import segments
from .template import Summary, version_bytes, writing

log = logging.getLogger(__name__)

MAX_SEGMENTS = 8
MERGE_AT_ONCE = 4
DELETED_SHARE = 0.2


def choose_merge(sizes: Sequence[tuple[int, int]], everything: bool = False) -> list[int]:
    """Positions of the segments to merge into one, given (live rows, all rows) of each; [] when
    nothing needs merging. everything: all of them (unless one segment with nothing deleted)."""
    if everything:
        if len(sizes) == 1 and sizes[0][0] == sizes[0][1]:
            return []
        return list(range(len(sizes)))
    chosen = [i for i, (live, total) in enumerate(sizes) if total - live > DELETED_SHARE * total]
    after = len(sizes) - max(len(chosen) - 1, 0)
    if after > MAX_SEGMENTS:
        need = max(MERGE_AT_ONCE, len(sizes) - MAX_SEGMENTS + 1) - len(chosen)
        rest = sorted((i for i in range(len(sizes)) if i not in chosen), key=lambda i: sizes[i][0])
        chosen += rest[: max(need, 0)]
    return sorted(chosen)


def compact(
    root: str | Path,
    everything: bool = True,
    keep: int = layout.KEEP_VERSIONS,
    ram_budget: int | None = None,
) -> Summary:
    """Merge the current version's segments (all of them, or those the policy picks) into one
    new segment of live rows and publish a version listing it in their place; nothing when there
    is nothing to merge."""
    with writing(root, "compact", from_current=True, keep=keep) as w:
        listing = segments.Listing.of(w.current)
        sizes = listing.sizes()
        chosen = choose_merge(sizes, everything)
        if not chosen:
            w.unchanged({"segments": len(sizes)})
        else:
            w.needs(lambda: sum(version_bytes(listing.files[i]) for i in chosen))
            w.reuse_from = [listing.files[i].directory for i in chosen]
            ids, vectors = segments.gather(w, listing, chosen)
            dropped = sum(sizes[i][1] - sizes[i][0] for i in chosen)
            changes = {"segments merged": len(chosen), "deleted rows dropped": dropped}
            outcome = {
                "counts": {"merged": len(chosen), "dropped": dropped, "images": len(ids)},
                "merged": [listing.paths[i] for i in chosen],
            }
            info = segments.segment_info(w.current)
            if ram_budget is not None:
                info["ram_budget"] = ram_budget
            kind = segments.segment_index_type(info.get("index_type"), len(ids))
            segment = w.publish(vectors, ids, info, outcome, kind, changes, as_segment=True)
            segments.publish_listing(w, listing, chosen, segment, [], info, outcome, changes)
    return w.summary


def by_policy(root: str | Path, keep: int = layout.KEEP_VERSIONS) -> Summary | None:
    """The automatic compaction after a write: the policy's merge if it picks one (another
    writer holding the root: skipped, the next write runs it)."""
    try:
        summary = compact(root, everything=False, keep=keep)
    except IndexLockedError:
        log.info("compaction skipped: another writer holds %s", root)
        return None
    return summary if summary.published else None
