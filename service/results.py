"""Index hits to response items: metadata from the store, URLs built from ids (never from paths)."""

from __future__ import annotations

from typing import Any

from index.store import Hit, IndexStore

from .schemas import ImageMetadata, SearchResult


def image_urls(root: str, image_id: int) -> dict[str, str]:
    base = f"{root}/v1/images/{image_id}"
    return {
        "image_url": base,
        "thumbnail_url": f"{base}/thumbnail",
        "similar_url": f"{base}/similar",
    }


def describe(hit: Hit, row: dict[str, Any], root: str) -> SearchResult:
    metadata = ImageMetadata(
        relpath=row["relpath"],
        width=row["width"],
        height=row["height"],
        size_bytes=row["size_bytes"],
        modality=row.get("modality"),
        view=row.get("view"),
        fields=row.get("meta") or {},
    )
    return SearchResult(
        id=str(hit.id),
        score=hit.score,
        metadata=metadata,
        report=row.get("report") or None,
        **image_urls(root, hit.id),
    )


def describe_hits(store: IndexStore, hits: list[Hit], root: str) -> list[SearchResult]:
    """Response items for index hits, metadata read from `store` (blocking: SQLite)."""
    rows = store.get_many([hit.id for hit in hits])
    return [describe(hit, rows[hit.id], root) for hit in hits if hit.id in rows]
