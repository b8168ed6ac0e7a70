"""Manifests of (image, report) pairs, the pair dataset and its deterministic sampler.

Every random choice for a sample (crop, flip, sentence...) is seeded by (seed, epoch, index), so a
run is reproducible whatever the number of workers, and a resumed run sees exactly the samples an
uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from convirt.config import ModelConfig
from convirt.imageio import ImageDecodeError, load_image
from convirt.manifest import ManifestError, read_manifest_rows
from convirt.sentences import report_sentences, sample_sentence
from convirt.transforms import eval_transform, pil_to_tensor, resize_shorter, train_transform

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One manifest row: an image path (absolute), its report text and the other columns."""

    image: Path
    text: str
    meta: dict[str, str] = field(default_factory=dict)
    source: str = ""


@dataclass
class Skipped:
    path: str
    reason: str


def load_records(
    manifest: str | Path,
    split: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    split_column: str = "split",
    require_text: bool = False,
) -> tuple[list[Record], list[Skipped]]:
    """Records of one split; missing files (and, with require_text, empty texts) are skipped."""
    manifest = Path(manifest)
    rows = read_manifest_rows(manifest)
    if not rows:
        raise ManifestError(f"{manifest} has no rows")
    columns = list(rows[0].keys())
    for needed in (image_column, text_column) if require_text else (image_column,):
        if needed not in columns:
            raise ManifestError(
                f"{manifest} has no column {needed!r}; its columns are: {', '.join(columns)} "
                "(choose with --image-column / --text-column)"
            )
    if split is not None and split_column not in columns:
        raise ManifestError(f"{manifest} has no {split_column!r} column to select split {split!r}")
    records, skipped = [], []
    for row in rows:
        if split is not None and row.get(split_column) != split:
            continue
        image = (manifest.parent / row[image_column]).resolve()
        text = (row.get(text_column) or "").strip()
        if not image.is_file():
            skipped.append(Skipped(str(image), "file not found"))
        elif require_text and not text:
            skipped.append(Skipped(str(image), "empty text"))
        else:
            meta = {k: v for k, v in row.items() if k not in (image_column, text_column)}
            records.append(Record(image, text, meta, source=manifest.parent.name))
    return records, skipped


def report_skips(skipped: Sequence[Skipped], what: str) -> None:
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    log.warning("%s: skipped %d rows (%s); first: %s", what, len(skipped), summary, skipped[0].path)


def decode_for_cache(path: Path, resize: int) -> torch.Tensor:
    """Decode once and shrink so the shorter side is `resize`: what the transforms start from."""
    return pil_to_tensor(resize_shorter(load_image(path), resize))


class PairDataset(Dataset):
    """(image tensor, one sampled sentence) per record; indexed by (epoch, index) keys."""

    def __init__(
        self,
        records: Sequence[Record],
        config: ModelConfig,
        train: bool,
        seed: int = 0,
        sentence_filter: str = "none",
        preload: bool = True,
        threads: int = 2,
        progress: bool = True,
    ):
        self.config = config
        self.train = train
        self.seed = seed
        self.transform = train_transform(config) if train else eval_transform(config)
        self.skipped: list[Skipped] = []
        self.cache: list[torch.Tensor] | None = None
        if preload:
            records = self._preload(records, threads, progress)
        self.records = list(records)
        self.sentences = [report_sentences(r.text, sentence_filter) for r in self.records]

    def _preload(self, records: Sequence[Record], threads: int, progress: bool) -> list[Record]:
        def decode(record: Record):
            try:
                return decode_for_cache(record.image, self.config.resize)
            except ImageDecodeError as err:
                return Skipped(str(record.image), str(err))

        kept, cache = [], []
        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = pool.map(decode, records)
            bar = tqdm(results, total=len(records), desc="decoding images", disable=not progress)
            for record, result in zip(records, bar, strict=True):
                if isinstance(result, Skipped):
                    self.skipped.append(result)
                else:
                    kept.append(record)
                    cache.append(result)
        self.cache = cache
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def sample_seed(self, epoch: int, index: int) -> int:
        return hash((self.seed, epoch, index, self.train)) & 0x7FFF_FFFF

    def image_tensor(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index]
        return decode_for_cache(self.records[index].image, self.config.resize)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        epoch, index = key
        for attempt in range(len(self.records)):
            candidate = (index + attempt) % len(self.records)
            try:
                return self._sample(epoch, candidate)
            except ImageDecodeError as err:
                # Without preloading, a bad file shows up only here, inside a loader worker:
                # skip it for the next record rather than crash the whole run.
                log.warning("skipping unreadable image %s: %s", self.records[candidate].image, err)
        raise ImageDecodeError("no readable image in the dataset")

    def _sample(self, epoch: int, index: int) -> tuple[torch.Tensor, str]:
        seed = self.sample_seed(epoch, index)
        image = self.image_tensor(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        text = self.records[index].text
        return pixels, sample_sentence(self.sentences[index], random.Random(seed), text)


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a seeded permutation per epoch, this rank's share of it, whole
    batches only (a contrastive batch of one teaches nothing), from batch `start_batch` on."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        epoch: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.size, self.batch_size, self.epoch, self.seed = size, batch_size, epoch, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        return (self.size // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.batches_per_epoch() * self.batch_size
        mine = order[self.rank :: self.world_size][:per_rank]
        for index in mine[self.start_batch * self.batch_size :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class Collator:
    """Stacks images and tokenises the sampled sentences (runs inside the loader workers)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, batch: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([b[0] for b in batch])
        tokens = self.tokenizer(
            [b[1] for b in batch],
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        return {
            "pixels": pixels,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }
