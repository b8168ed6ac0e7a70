"""What the search core takes and gives: plain data, no HTTP.

The routes (service/api/) build SearchOptions and Refinement from their request bodies, form or
query fields (service/api/query_params.py), and pack a Found's cards into their response
(service/api/results.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.read.keywords import Keywords
from index.read.limits import K_DEFAULT
from service.model.region import Box

from .calibration import Scale
from .cards import Card
from .feedback import Weights


@dataclass(frozen=True)
class SearchOptions:
    """What every search takes besides its query: how many, which images, how they are shown."""

    k: int = K_DEFAULT
    filters: Mapping[str, Any] = field(default_factory=dict)
    keywords: Keywords | None = None
    group_by: str = "study"  # study, patient or none
    min_score: float | None = None


@dataclass(frozen=True)
class Refinement:
    """A search moved toward liked results and away from disliked ones (feedback.py): from a
    text, an indexed image or a region of it, an upload or a region of it (its encoder vector,
    kept.py), or the liked images alone."""

    text: str | None = None
    image_id: int | None = None
    liked: tuple[int, ...] = ()
    disliked: tuple[int, ...] = ()
    weights: Weights = field(default_factory=Weights)
    exclude_disliked: bool = True
    upload: np.ndarray | None = None  # instead of text or image_id (a region's, given a box)
    box: Box | None = None  # with image_id: the region of it being refined


@dataclass(frozen=True)
class Found:
    """A search's answer: its cards, the version and model that found them, and how long each
    stage took (ms, index.read.timings)."""

    results: list[Card]
    index_version: str
    model_fingerprint: str
    truncated: bool = False  # text queries: the text ran past the encoder's token limit
    mode: str = "image"  # text queries: what ranked them (index.read.hybrid)
    timings: dict[str, float] = field(default_factory=dict)
    scale: Scale | None = None  # what its scores mean (calibration.py); None until calibrated
    vector: np.ndarray | None = None  # image queries: what was searched by (an upload is kept)
