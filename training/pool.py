"""Retrieval pools: a fixed-size, seeded sample of pairs, as in the ROCO-2k protocol (2,000 pairs
whose caption has enough words to describe the image; recall@K depends on the pool's size, so
figures are only comparable over pools of the same size).

The sample ranks every eligible pair by a hash of (seed, image path as the manifest names it,
caption) and keeps the lowest: a uniform draw without replacement that gives the same pairs for a
seed whatever the order of the input, the machine, the Python or numpy version, and the folder the
dataset lies in. A smaller pool of the same seed is a subset of a larger one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from convirt.manifest import ManifestItem


def caption_words(text: str) -> int:
    """Words of a caption, split on whitespace."""
    return len(text.split())


def pool_rank(item: ManifestItem, seed: int) -> tuple[bytes, str, str]:
    """The item's place in the seed's random order (ties, if a hash ever collides, by name)."""
    digest = hashlib.sha256(f"{seed}\0{item.relpath}\0{item.text}".encode()).digest()
    return digest, item.relpath, item.text


def sample_pool(
    items: Sequence[ManifestItem], size: int | None, min_words: int = 0, seed: int = 0
) -> list[ManifestItem]:
    """The items whose caption has at least min_words words, then `size` of them drawn at random
    for the seed (all of them when fewer are eligible, or when size is None), in input order."""
    if size is not None and size < 1:
        raise ValueError(f"pool size must be at least 1, got {size}")
    if min_words < 0:
        raise ValueError(f"min words must be at least 0, got {min_words}")
    eligible = [item for item in items if caption_words(item.text) >= min_words]
    if size is None or size >= len(eligible):
        return eligible
    ranked = sorted(range(len(eligible)), key=lambda i: pool_rank(eligible[i], seed))
    return [eligible[i] for i in sorted(ranked[:size])]
