"""The pair table, the pair dataset and its deterministic sampler.

Every random choice for a sample (crop, flip, sentence...) is seeded by (seed, epoch, index), so a
run is reproducible whatever the number of workers, and a resumed run sees exactly the samples an
uninterrupted one would have seen.

Images come from the image cache (convirt.imagecache), read by position when a sample needs them:
memory holds a few numbers per row and the distinct report texts, whatever the archive's size.
"""

from __future__ import annotations

import logging
import os
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from convirt.cachebuild import Resolver
from convirt.config import ModelConfig
from convirt.imagecache import CacheReader, Entry, ImageCache
from convirt.manifest import ManifestItem, Skip, iter_manifest
from convirt.sentences import report_sentences, sample_sentence
from convirt.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

# Set to a path prefix to log which rows each process reads ("PREFIX.PID": epoch,row per line):
# shows, for instance, that torchrun ranks read disjoint shares of an epoch.
TRACE_ENV = "CONVIRT_TRACE_SAMPLES"


@dataclass
class PairTable:
    """Rows of (cached image, report) as flat arrays. Each distinct report text is held once."""

    offsets: np.ndarray  # int64: where the row's image starts in the cache's pixel file
    heights: np.ndarray  # int32
    widths: np.ndarray  # int32
    text_ids: np.ndarray  # int32, into texts
    texts: list[str]
    positions: np.ndarray  # int64: each row's place among the items it was read from
    # int64: the row's case (CASE_COLUMNS), -1 when the manifest names none; rows of one case
    # are not negatives of each other under `false_negatives: mask`
    case_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def entry(self, row: int) -> Entry:
        return Entry(int(self.offsets[row]), int(self.heights[row]), int(self.widths[row]))

    def text(self, row: int) -> str:
        return self.texts[self.text_ids[row]]


# Manifest columns that name a case: medpix case_id, covid-cxr/covid-ct patient_id (with the
# covid-ct paper, whose patient numbers restart per paper). Rows sharing all present values are
# one case; a row with none of them is a case of its own.
CASE_COLUMNS = ("case_id", "patient_id", "paper")


def case_key(item: ManifestItem) -> tuple[str, ...] | None:
    values = tuple(f"{c}={item.meta[c]}" for c in CASE_COLUMNS if item.meta.get(c))
    return (str(item.path.parent), *values) if values else None


def pair_table(
    resolved: Iterable[tuple[ManifestItem, Entry] | Skip],
) -> tuple[PairTable, list[Skip]]:
    """Collect resolved rows (see convirt.cachebuild.Resolver) into a table, and the skips."""
    columns = {
        name: array("q")
        for name in ("offsets", "heights", "widths", "text_ids", "positions", "case_ids")
    }
    text_ids: dict[str, int] = {}
    case_ids: dict[tuple[str, ...], int] = {}
    skipped: list[Skip] = []
    for position, row in enumerate(resolved):
        if isinstance(row, Skip):
            skipped.append(row)
            continue
        item, entry = row
        columns["offsets"].append(entry.offset)
        columns["heights"].append(entry.height)
        columns["widths"].append(entry.width)
        columns["text_ids"].append(text_ids.setdefault(item.text, len(text_ids)))
        columns["positions"].append(position)
        key = case_key(item)
        columns["case_ids"].append(-1 if key is None else case_ids.setdefault(key, len(case_ids)))
    arrays = {name: np.frombuffer(values, np.int64) for name, values in columns.items()}
    for name in ("heights", "widths", "text_ids"):
        arrays[name] = arrays[name].astype(np.int32)
    return PairTable(**arrays, texts=list(text_ids)), skipped


def load_pairs(
    manifests: Sequence[Path],
    split: str | None,
    cache: ImageCache,
    side: int,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[PairTable, list[Skip]]:
    """The (image, report) pairs of one split of every manifest, read through the image cache
    (filled first where images are missing from it)."""
    items = chain.from_iterable(iter_manifest(m, split, require_text=True) for m in manifests)
    resolver = Resolver(cache, side, workers, progress, desc=f"images [{split}]")
    return pair_table(resolver.resolve(items))


def log_skips(skipped: Sequence[Skip], what: str) -> None:
    """One warning line for the rows a load skipped: how many, why, the first one's path."""
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    log.warning("%s: skipped %d rows (%s); first: %s", what, len(skipped), summary, skipped[0].path)


class PairDataset(Dataset):
    """(image tensor, one sampled sentence) per row; indexed by (epoch, index) keys."""

    def __init__(
        self,
        table: PairTable,
        reader: CacheReader,
        config: ModelConfig,
        train: bool,
        seed: int = 0,
        sentence_filter: str = "none",
        full_text_words: int = 0,
    ):
        self.table = table
        self.reader = reader
        self.config = config
        self.train = train
        self.seed = seed
        self.sentence_filter = sentence_filter
        self.full_text_words = full_text_words
        self.transform = train_transform(config) if train else eval_transform(config)
        self.trace = os.environ.get(TRACE_ENV)
        self._sentences: dict[int, list[str]] = {}  # per report, filled as samples need them

    def __len__(self) -> int:
        return len(self.table)

    def sample_seed(self, epoch: int, index: int) -> int:
        return hash((self.seed, epoch, index, self.train)) & 0x7FFF_FFFF

    def image_tensor(self, index: int) -> torch.Tensor:
        """The cached image of a row: 1 x H x W uint8, shorter side = the config's resize."""
        return torch.from_numpy(self.reader.read(self.table.entry(index)))[None]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        epoch, index = key
        self._log_read(epoch, index)
        seed = self.sample_seed(epoch, index)
        image = self.image_tensor(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        text = self.table.text(index)
        return pixels, sample_sentence(self.sentences(index), random.Random(seed), text)

    def sentences(self, index: int) -> list[str]:
        """The report's sentences a sample draws from, split once per report (per process).
        A report of at most `full_text_words` words is one "sentence": the whole of it."""
        text_id = int(self.table.text_ids[index])
        if text_id not in self._sentences:
            text = self.table.texts[text_id]
            if self.full_text_words and len(text.split()) <= self.full_text_words:
                self._sentences[text_id] = [text.strip()]
            else:
                self._sentences[text_id] = report_sentences(text, self.sentence_filter)
        return self._sentences[text_id]

    def _log_read(self, epoch: int, index: int) -> None:
        if self.trace:
            with open(f"{self.trace}.{os.getpid()}", "a") as f:
                f.write(f"{epoch},{index}\n")


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

    def __init__(self, tokenizer, max_tokens: int, text_features=None):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        # With a locked text tower: sentences -> B x D tensor (training/features.SentenceTable).
        self.text_features = text_features

    def __call__(self, batch: list[tuple]) -> dict[str, torch.Tensor]:
        out = {"pixels": torch.stack([b[0] for b in batch])}
        if self.text_features is not None:  # a locked text tower: its cached sentence features
            out["text_features"] = self.text_features([b[1] for b in batch])
        else:
            out.update(self.tokenize([b[1] for b in batch]))
        if len(batch[0]) > 2:
            out["index"] = torch.tensor([b[2] for b in batch])
        return out

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def batch_groups(table: PairTable, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """2 x B ids for convirt_loss(groups=...): the report (text id) and the case of each row; a
    row without a case gets an id of its own, so it shares a group only by its report."""
    rows = np.asarray(rows, dtype=np.int64)
    cases = table.case_ids[rows] if table.case_ids is not None else np.full(len(rows), -1)
    cases = np.where(cases >= 0, cases, -2 - rows)
    return torch.from_numpy(np.stack([table.text_ids[rows].astype(np.int64), cases]))


class IndexedPairs(Dataset):
    """A PairDataset whose samples also carry their row (the collator passes it on as "index"),
    so a training step can tell which pairs of a batch share a report or a case."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        return (*self.dataset[key], key[1])
