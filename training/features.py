"""Feature caches of locked towers: a locked tower's output is computed once per input, ever.

Why: with a tower locked (LiT, Zhai et al. 2022) its output for an input never changes, so running
it at every step of every run wastes most of a CPU epoch. Its outputs are kept on disk, keyed by
the tower's fingerprint (a hash of its weights and of the preprocessing that feeds it) and by the
input's hash (a sentence's text; an image's cached pixels and the view's number). Runs share them;
a changed tower or input has another key, so nothing stale is ever read.

Layout: <root>/<kind>-<fingerprint>/<shard>.npz, each shard holding `keys` (hex strings) and
`vectors` (float32 N x D); a computation appends one shard, written atomically.
Image views: view 0 is the eval view (resize, centre crop), view 1 its mirror image, views 2.. are
the training augmentation t_v drawn with a seed fixed by (image hash, view): augmentation survives
the cache, K views per image (`image_views`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from convirt.bundle import fingerprint_state
from convirt.config import ModelConfig
from convirt.paths import cache_dir
from convirt.transforms import PAPER_AUGMENTATION, eval_transform, train_transform

from .data import PairDataset

log = logging.getLogger(__name__)

FEATURES_SUBDIR = "features"
VIEW_SCHEME = 1  # bump when what a view number means changes


def feature_root(configured: str | Path | None = None) -> Path:
    """The feature cache: `configured`, else $CONVIRT_CACHE_DIR/features."""
    return Path(configured).expanduser() if configured else cache_dir() / FEATURES_SUBDIR


def tower_fingerprint(module: nn.Module, **settings: object) -> str:
    """A hash of a tower's weights and of the settings that shape its input (16 hex chars)."""
    state = {k: v for k, v in module.state_dict().items()}
    described = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(f"{fingerprint_state(state)}|{described}".encode()).hexdigest()[:16]


def text_fingerprint(encoder: nn.Module, tokenizer, max_tokens: int) -> str:
    vocab = getattr(tokenizer, "vocab_size", None)
    return "text-" + tower_fingerprint(
        encoder, max_tokens=max_tokens, tokenizer=type(tokenizer).__name__, vocab=vocab
    )


def image_fingerprint(encoder: nn.Module, config: ModelConfig) -> str:
    return "image-" + tower_fingerprint(
        encoder, image_size=config.image_size, resize=config.resize,
        normalisation=config.normalisation, augmentation=repr(PAPER_AUGMENTATION),
        views=VIEW_SCHEME,
    )  # fmt: skip


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def pixels_key(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:32]


class FeatureStore:
    """The vectors one tower (one fingerprint) gave, by input key, read from and added to disk."""

    def __init__(self, root: Path, fingerprint: str):
        self.folder = Path(root) / fingerprint
        self.vectors: dict[str, np.ndarray] = {}
        self.computed = 0  # inputs this process ran through the tower (tests, logs)
        for shard in sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []:
            with np.load(shard) as data:
                for key, vector in zip(data["keys"], data["vectors"], strict=True):
                    self.vectors[str(key)] = vector

    def __contains__(self, key: str) -> bool:
        return key in self.vectors

    def missing(self, keys: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(k for k in keys if k not in self.vectors))

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Keep and write one shard (atomically: a killed run leaves no half shard)."""
        if not len(keys):
            return
        vectors = np.asarray(vectors, np.float32)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".shard.", suffix=".npz", dir=self.folder)
        os.close(handle)
        np.savez(tmp, keys=np.array(keys), vectors=vectors)
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        os.replace(tmp, self.folder / f"{name}.npz")
        self.vectors.update(zip(keys, vectors, strict=True))
        self.computed += len(keys)

    def stack(self, keys: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[k] for k in keys])


def _fill(
    store: FeatureStore,
    keys: Sequence[str],
    compute: Callable[[list[str]], np.ndarray],
    batch_size: int,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Vectors of `keys` (in order), running `compute` on missing keys in batches."""
    todo = store.missing(keys)
    if todo:
        log.info("%s: computing %d of %d (cache %s)", desc, len(todo), len(set(keys)), store.folder)
        starts = range(0, len(todo), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            chunk = todo[start : start + batch_size]
            store.add(chunk, compute(chunk))
    return store.stack(keys) if len(keys) else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def text_features(
    encoder: nn.Module,
    tokenizer,
    max_tokens: int,
    texts: Sequence[str],
    root: Path,
    batch_size: int = 64,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, FeatureStore]:
    """h_u of each text (N x D, in order), from the cache or computed once into it."""
    encoder.eval()
    store = FeatureStore(root, text_fingerprint(encoder, tokenizer, max_tokens))
    by_key = {text_key(t): t for t in texts}

    def compute(keys: list[str]) -> np.ndarray:
        tokens = tokenizer(
            [by_key[k] for k in keys], padding=True, truncation=True, max_length=max_tokens,
            return_tensors="pt",
        )  # fmt: skip
        h = encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return h.float().cpu().numpy()

    keys = [text_key(t) for t in texts]
    return _fill(store, keys, compute, batch_size, "text features", progress), store


def image_views(pixels: torch.Tensor, config: ModelConfig, key: str, views: int) -> torch.Tensor:
    """K x 3 x S x S: the eval view, its mirror image, then t_v draws seeded by (key, view)."""
    base = eval_transform(config)(pixels)
    out = [base, torch.flip(base, dims=[-1])][:views]
    augment = train_transform(config)
    for view in range(2, views):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(hashlib.sha256(f"{key}/{view}".encode()).hexdigest()[:8], 16))
            out.append(augment(pixels))
    return torch.stack(out)


@torch.inference_mode()
def image_features(
    encoder: nn.Module,
    dataset: PairDataset,
    views: int,
    root: Path,
    batch_size: int = 32,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, FeatureStore]:
    """h_v of K views of every row's image (rows x K x D), from the cache or computed once.
    Rows showing the same pixels share their features."""
    encoder.eval()
    config = dataset.config
    store = FeatureStore(root, image_fingerprint(encoder, config))
    image_keys = [
        pixels_key(dataset.reader.read(dataset.table.entry(i))) for i in range(len(dataset))
    ]
    first_row = {}
    for row, key in enumerate(image_keys):
        first_row.setdefault(key, row)
    missing_images = list(dict.fromkeys(k.split("/")[0] for k in store.missing(
        [f"{k}/{v}" for k in image_keys for v in range(views)])))  # fmt: skip
    per_batch = max(1, batch_size // views)
    desc = f"image features ({views} views)"
    if missing_images:
        log.info("%s: computing %d of %d images (cache %s)", desc, len(missing_images),
                 len(first_row), store.folder)  # fmt: skip
    starts = range(0, len(missing_images), per_batch)
    for start in tqdm(starts, desc=desc, disable=not progress or not missing_images, unit="batch"):
        chunk = missing_images[start : start + per_batch]
        stacked = torch.cat([
            image_views(dataset.image_tensor(first_row[k]), config, k, views) for k in chunk
        ])  # fmt: skip
        h = encoder(stacked.to(device)).float().cpu().numpy()
        store.add([f"{k}/{v}" for k in chunk for v in range(views)], h)
    keys = [f"{k}/{v}" for k in image_keys for v in range(views)]
    vectors = store.stack(keys)
    return vectors.reshape(len(dataset), views, -1), store


class SentenceTable:
    """Sentence -> cached feature lookup for a training loader's collator (picklable)."""

    def __init__(self, sentences: Sequence[str], vectors: np.ndarray):
        self.index = {s: i for i, s in enumerate(sentences)}
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))

    def __call__(self, sentences: Sequence[str]) -> torch.Tensor:
        try:
            return self.vectors[[self.index[s] for s in sentences]]
        except KeyError as err:
            raise KeyError(f"sentence without a cached feature: {err}") from None


def all_sentences(dataset: PairDataset) -> list[str]:
    """Every sentence a training sample can draw (each report's, as PairDataset splits them),
    with the whole report text, which sample_sentence falls back on."""
    found: dict[str, None] = {}
    seen_reports: set[int] = set()
    for row in range(len(dataset)):
        text_id = int(dataset.table.text_ids[row])
        if text_id in seen_reports:
            continue
        seen_reports.add(text_id)
        for sentence in dataset.sentences(row):
            found.setdefault(sentence)
        found.setdefault(dataset.table.texts[text_id].strip())
    return list(found)
