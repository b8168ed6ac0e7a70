"""Why an image matched a query: occlusion-sensitivity heat-maps.

A grey patch slides over the image; every occluded copy is embedded and compared with the query,
and the similarity it loses is credited to the cells the patch covered. A cell's value is the mean
drop over the patches that covered it: high means hiding that part of the image made the match
worse (it supported the match), negative means hiding it made the match better.

Why occlusion rather than gradients (Grad-CAM, saliency) or attention:
- model-agnostic: it needs nothing but `Embedder.embed_pixels`, so it works the same for every
  image encoder and for both spaces (a text query in the joint space, an image query in the
  encoder space), with no hooks into the network's layers;
- faithful by construction: the map *is* the change in the score the user saw when a region is
  removed, not a first-order local approximation of it, so hiding the hottest cells must lower the
  score more than hiding random ones (tests/test_explain.py measures that);
- cheap: the occluded copies (49 at the defaults) and the unoccluded image are one batch of 50
  images through `embed_pixels`, in chunks of `batch_size`, with no backward pass; the drops of
  every cell come from that one pass.

What "hidden" means (`hide`): the pixels are set to 0 in normalised space, i.e. to the
normalisation mean (mid grey for the Lite encoders, the ImageNet mean for ResNet50): the value the
backbone was trained to read as "no signal", the same for every image and every patch, so each
patch is removed alike and nothing of what it covered leaks through (a blur keeps a blurred mass
visible). Measured with the deletion test (tests/test_explain.py, 20 medpix pairs), a Gaussian
blur (sigma S/16) and the image's own mean did no better: 0.028 and 0.026 mean extra drop of
the hottest 10% over a random 10%, against 0.028 for this constant.

Reading the map: `HeatMap.grid[r, c]` is the cosine similarity the image loses, on average, when a
patch over cell (r, c) is hidden; compare cells within one map (its scale depends on the model and
the query), and place it on the original image with `HeatMap.crop` (the eval view is a centre
crop, so the map does not cover the whole image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .inference import Embedder

SPACES = ("joint", "encoder")
# Defaults: an 8x8 grid of cells, a patch a quarter of the side (2x2 cells) moved one cell at a
# time, so 7x7 = 49 occluded copies. A quarter of the side hides a lesion-sized region (a
# node, a mass) without hiding the organ around it; a stride of half the patch makes every
# interior cell the mean of four patches, which smooths the map without more forwards.
GRID = 8
PATCH = 0.25
# Images per forward: on a CPU, small chunks beat one batch of 50, whose activations outgrow the
# cache (bench/explain_latency.py --batch-size 1,2,4,10,25,50 compares them; docs/benchmarks.md).
BATCH_SIZE = 5


@dataclass(frozen=True)
class HeatMap:
    """The occlusion map of one image for one query."""

    grid: np.ndarray  # rows x cols float32: similarity lost when that cell is hidden (may be < 0)
    score: float  # cosine similarity of the unoccluded image to the query
    crop: tuple[float, float, float, float]  # (left, top, width, height) of the original image


def occlusion_map(
    embedder: Embedder,
    pixels: torch.Tensor,
    query: np.ndarray,
    space: str = "joint",
    *,
    grid: int = GRID,
    patch: float = PATCH,
    batch_size: int = BATCH_SIZE,
    original_size: tuple[int, int] | None = None,
) -> HeatMap:
    """The occlusion heat-map of `pixels` (3xSxS, from `embedder.preprocess`) for `query`.

    query: an L2-normalised vector in `space` (normalised again here): "joint" for a text query
    (`embed_texts`), "encoder" for an image query (the first array `embed_pixels` returns).
    patch: the side of the occluding square as a fraction of the image side, rounded to whole
    cells; it moves one cell at a time.
    original_size: (width, height) of the image before preprocessing, to place the map on it
    (`crop`); without it the crop is the whole of `pixels`.
    """
    size = _check_pixels(pixels, embedder.bundle.config.image_size)
    target = _check_query(query, embedder, space)
    span = _patch_cells(grid, patch)
    if grid > size:
        raise ValueError(f"grid {grid} has more cells than the image has pixels ({size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    starts = [(r, c) for r in range(grid - span + 1) for c in range(grid - span + 1)]
    masks = _patch_masks(starts, span, cell_edges(size, grid))
    similarities = _similarities(embedder, pixels, masks, target, space, batch_size)
    score, drops = similarities[0], similarities[0] - similarities[1:]
    total = np.zeros((grid, grid), np.float64)
    count = np.zeros((grid, grid), np.int64)
    for (r, c), drop in zip(starts, drops, strict=True):
        total[r : r + span, c : c + span] += drop
        count[r : r + span, c : c + span] += 1
    crop = (0.0, 0.0, 1.0, 1.0)
    if original_size is not None:
        crop = crop_box(*original_size, embedder.bundle.config)
    return HeatMap((total / count).astype(np.float32), float(score), crop)


def crop_box(width: int, height: int, config: ModelConfig) -> tuple[float, float, float, float]:
    """(left, top, width, height), as fractions of a width x height image, of what the eval view
    keeps: the shorter side shrunk to config.resize (as `resize_shorter` rounds), then a centred
    config.image_size square (as torchvision's CenterCrop places it). A web page overlays the map
    on the original image there. Parts outside 0..1 are padding (a resize below the crop size)."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    scale = config.resize / min(width, height)
    if abs(scale - 1.0) >= 1e-6:  # resize_shorter leaves an image already at the side alone
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    side = config.image_size
    left, top = _crop_start(width, side), _crop_start(height, side)
    return (left / width, top / height, side / width, side / height)


def hide(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`pixels` (3xSxS, normalised) with the True pixels of `mask` hidden: set to 0, the
    normalisation mean (module docstring). A mask of shape BxSxS gives a Bx3xSxS batch."""
    if mask.dtype != torch.bool or mask.ndim not in (2, 3) or mask.shape[-2:] != pixels.shape[-2:]:
        raise ValueError(
            f"mask must be a boolean SxS or BxSxS tensor matching pixels {tuple(pixels.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return torch.where(mask.unsqueeze(-3), torch.zeros((), dtype=pixels.dtype), pixels)


def cell_mask(
    grid: np.ndarray,
    fraction: float,
    size: int,
    *,
    hottest: bool = True,
    rng: np.random.Generator | int | None = None,
) -> torch.Tensor:
    """A boolean size x size mask over `fraction` of the pixels: the hottest cells of `grid` first
    (or cells in a random order, drawn from `rng`), each cell the block of pixels it covers at
    that size; the last cell taken is cut, row by row, to hit the fraction exactly. Random cells
    rather than random pixels, so both masks hide blocks of the same shape."""
    heat = np.asarray(grid, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"grid must be a non-empty 2-D array, got shape {heat.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if size < max(heat.shape):
        raise ValueError(f"size {size} is smaller than the grid {heat.shape}")
    if hottest:
        order = np.argsort(-heat, axis=None, kind="stable")
    else:
        order = np.random.default_rng(rng).permutation(heat.size)
    rank = np.empty(heat.size, np.int64)
    rank[order] = np.arange(heat.size)
    rows = np.searchsorted(cell_edges(size, heat.shape[0]), np.arange(size), side="right") - 1
    cols = np.searchsorted(cell_edges(size, heat.shape[1]), np.arange(size), side="right") - 1
    pixel_rank = rank.reshape(heat.shape)[rows[:, None], cols[None, :]]
    taken = np.lexsort((np.arange(size * size), pixel_rank.ravel()))[: round(fraction * size**2)]
    mask = np.zeros(size * size, bool)
    mask[taken] = True
    return torch.from_numpy(mask.reshape(size, size))


def cell_edges(size: int, cells: int) -> np.ndarray:
    """The cells+1 pixel boundaries that cut `size` pixels into `cells` near-equal runs."""
    return np.arange(cells + 1) * size // cells


def _crop_start(length: int, side: int) -> int:
    if length >= side:
        return round((length - side) / 2)  # half to even, as CenterCrop's round()
    return -((side - length) // 2)  # CenterCrop pads first, the odd pixel after


def _check_pixels(pixels: torch.Tensor, side: int) -> int:
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise ValueError("pixels must be a float tensor from embedder.preprocess(image)")
    if tuple(pixels.shape) != (3, side, side):
        raise ValueError(
            f"pixels must be one preprocessed image of shape (3, {side}, {side}), "
            f"got {tuple(pixels.shape)}"
        )
    return side


def _check_query(query: np.ndarray, embedder: Embedder, space: str) -> np.ndarray:
    dims = {"joint": embedder.dim, "encoder": embedder.image_feature_dim}
    if space not in dims:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    vector = np.asarray(query, dtype=np.float32)
    if vector.shape != (dims[space],):
        raise ValueError(
            f"query must be one {dims[space]}-d vector in the {space} space, got shape "
            f"{vector.shape}"
        )
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("query must be a finite, non-zero vector")
    return vector / norm


def _patch_cells(grid: int, patch: float) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be a whole number of cells, at least 2, got {grid!r}")
    if not 0.0 < patch <= 1.0:
        raise ValueError(f"patch must be a fraction of the image side in (0, 1], got {patch}")
    return min(grid, max(1, round(patch * grid)))


def _patch_masks(starts: list[tuple[int, int]], span: int, edges: np.ndarray) -> torch.Tensor:
    """One SxS mask per patch position (top-left cell, `span` cells a side), after an empty one
    for the unoccluded image."""
    size = int(edges[-1])
    masks = torch.zeros(len(starts) + 1, size, size, dtype=torch.bool)
    for i, (r, c) in enumerate(starts, start=1):
        masks[i, edges[r] : edges[r + span], edges[c] : edges[c + span]] = True
    return masks


@torch.inference_mode()
def _similarities(
    embedder: Embedder,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    target: np.ndarray,
    space: str,
    batch_size: int,
) -> np.ndarray:
    """Cosine similarity to `target` of `pixels` hidden by each mask, in batches."""
    column = 0 if space == "encoder" else 1
    parts = []
    for start in range(0, len(masks), batch_size):
        vectors = embedder.embed_pixels(hide(pixels, masks[start : start + batch_size]))[column]
        parts.append(vectors @ target)
    return np.concatenate(parts).astype(np.float64)
