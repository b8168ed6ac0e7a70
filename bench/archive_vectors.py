"""Synthetic archive images for bench/archive_scale.py: (joint 512-d, encoder 1,280-d) vector
pairs and metadata rows, fitted to a real index version (the demo's 5,456 images).

Why not noisy copies of a few thousand centres (the search benchmark before issue 25): at 1M
images each centre had ~400 copies in an isotropic ball, so the true neighbours of a query were
all nearly equidistant and no compressed structure could rank them (PQ recall@10 0.12). A real
archive's density is continuous, not a few thousand tight balls. So every generated image is a
random convex mixture of real images that are neighbours, plus a little noise shaped like the
real spread:

    study     a run of images sharing one anchor: a real image drawn uniformly; its size drawn
              from the real group sizes (MedPix cases, covid-cxr patients, ROCO articles)
    parents   the anchor and PARENTS - 1 of its NEIGHBOURS nearest real images (cosine over
              joint and encoder together), drawn per study
    weights   a study draws Dirichlet(ALPHA) weights over its parents: a point anywhere in their
              simplex, not near the anchor (so descendants of one anchor spread out instead of
              piling up); each of its images Dirichlet(STUDY_SPREAD * those) (images of one
              study look alike, as a case's slices do: the real near-duplicate tail)
    noise     a Gaussian with the real covariance's top NOISE_COMPONENTS principal axes and
              variances, times NOISE[space] and a per-study factor exp(NOISE_SPREAD * N(0, 1))
              (some images sit apart, as real outliers do)
    vector    sum(weights * parents) + noise, L2-normalised, in each space

The same parents and weights make both spaces, so an image's joint and encoder vectors stay
related as a real image's are. The metadata is the anchor's (dataset, normalised modality and
body part, sex, age; missing values filled from the nearest real image that has one), so filters
correlate with the vectors as they do in an archive; study, patient and date are synthetic
(the demo has no dates): a study's images share its id and date (uniform over DATE_FIRST..
DATE_LAST), a patient holds about 1.7 studies. Everything is deterministic by seed and generated in
chunks of CHUNK images (chunk c depends on the seed and c only, so the first 100k images of a
1M run are the 100k run's); a 10M x 1,792-float archive never has to be in memory or on disk.
Whether this matches the real neighbourhood structure is checked, not assumed:
`python bench/archive_scale.py --check` (docs/benchmarks.md, "Archive scale").
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index import layout
from index.fields import with_derived
from index.version import read_version

SPACES = ("joint", "encoder")
CHUNK = 32_768  # images per generated chunk
NEIGHBOURS = 10  # real neighbours a mixture draws its other parents from
PARENTS = 3  # real images mixed per generated image
ALPHA = 1.0  # Dirichlet concentration of the weights (1: uniform over the simplex)
NOISE = {"joint": 0.4, "encoder": 0.6}  # noise scale, in real standard deviations per axis
NOISE_COMPONENTS = 64  # principal axes the noise lives on, per space
NOISE_SPREAD = 0.7  # an image's noise scale: NOISE * exp(NOISE_SPREAD * N(0, 1)), per study
STUDY_SPREAD = 30.0  # Dirichlet concentration of a study's images around the study's weights
DATE_FIRST, DATE_LAST = datetime.date(2010, 1, 1), datetime.date(2025, 12, 31)
QUERY_STREAM = 1  # held-out images (queries) come from their own stream: never in the archive
GROUP_KEYS = ("case_id", "patient_id", "pmc_article")
LABELS = ("dataset", "modality", "body_part", "sex", "age")


@dataclass
class RealArchive:
    """What the generator draws from: the real vectors (unit rows), each image's neighbours and
    labels, the noise axes per space, the real study sizes."""

    vectors: dict[str, np.ndarray]
    neighbours: np.ndarray  # n x NEIGHBOURS row numbers
    noise_axes: dict[str, np.ndarray]  # space -> NOISE_COMPONENTS x d, scaled by the std dev
    labels: list[dict[str, str]]  # per real image: LABELS
    study_sizes: np.ndarray  # the real group sizes, one per group

    @property
    def count(self) -> int:
        return len(self.neighbours)


def fit(root: Path) -> RealArchive:
    """The generator's model of the index at `root` (its CURRENT version)."""
    files = read_version(layout.current_version_dir(root))
    vectors = {s: np.ascontiguousarray(files.vectors(s), dtype=np.float32) for s in SPACES}
    both = np.hstack([vectors[s] for s in SPACES]) / np.sqrt(len(SPACES))
    _, near = faiss.knn(both, both, NEIGHBOURS + 1, faiss.METRIC_INNER_PRODUCT)
    neighbours = np.array([[j for j in row if j != i][:NEIGHBOURS] for i, row in enumerate(near)])
    axes = {}
    for space, x in vectors.items():
        variances, rows = np.linalg.eigh(np.cov(x, rowvar=False))  # ascending
        top = np.argsort(variances)[::-1][:NOISE_COMPONENTS]
        spread = np.sqrt(np.maximum(variances[top], 0))
        axes[space] = (rows[:, top].T * spread[:, None]).astype(np.float32)
    labels, sizes = real_labels(files.directory / "meta.sqlite", files.ids(), vectors["joint"])
    return RealArchive(vectors, neighbours, axes, labels, sizes)


def real_labels(
    path: Path, ids: np.ndarray, joint: np.ndarray
) -> tuple[list[dict[str, str]], np.ndarray]:
    """Each real image's LABELS (normalised as index/fields.py derives them; a missing one from
    the nearest real image, by joint cosine, that has it) and the real group sizes."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    found = {}
    groups: Counter = Counter()
    for image_id, source, meta_text in conn.execute("SELECT id, source, meta FROM images"):
        meta = json.loads(meta_text)
        modality, derived = with_derived(meta, source)
        found[image_id] = {
            "dataset": meta.get("dataset"),
            "modality": modality if modality != "other" else None,
            "body_part": derived.get("body_part") if derived.get("body_part") != "other" else None,
            "sex": meta.get("sex"),
            "age": meta.get("age"),
        }
        key = next((k for k in GROUP_KEYS if meta.get(k)), None)
        groups[(key, meta.get(key)) if key else ("image", image_id)] += 1
    conn.close()
    labels = [found[int(i)] for i in ids]
    for name in LABELS:
        have = np.array([i for i, label in enumerate(labels) if label[name]])
        missing = [i for i, label in enumerate(labels) if not label[name]]
        if len(have) and missing:
            _, nearest = faiss.knn(joint[missing], joint[have], 1, faiss.METRIC_INNER_PRODUCT)
            for i, j in zip(missing, nearest[:, 0], strict=True):
                labels[i][name] = labels[have[j]][name]
    return labels, np.array(sorted(groups.values()))


@dataclass
class Chunk:
    """Images first .. first + len - 1 of a generated archive (ids first + 1 ...)."""

    first: int
    vectors: dict[str, np.ndarray]  # space -> len x d float32 unit rows (the spaces asked for)
    anchors: np.ndarray  # the real image each one's labels come from
    studies: np.ndarray  # study number (unique over the archive)
    patients: np.ndarray
    days: np.ndarray  # study date, days after DATE_FIRST

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first + 1, self.first + 1 + len(self.anchors), dtype=np.int64)


class Generator:
    """Deterministic chunks of a synthetic archive fitted to a RealArchive."""

    def __init__(self, real: RealArchive, seed: int = 0, stream: int = 0):
        self.real, self.seed, self.stream = real, seed, stream

    def chunk(self, number: int, size: int = CHUNK, spaces: tuple[str, ...] = SPACES) -> Chunk:
        """Chunk `number`, its first `size` images (a chunk cut short is a prefix of the whole)."""
        rng = np.random.default_rng([self.seed, self.stream, number])
        real = self.real
        lengths = rng.choice(real.study_sizes, size=CHUNK)  # more studies than a chunk needs
        study_of = np.repeat(np.arange(CHUNK), lengths)[:CHUNK]
        anchor_of_study = rng.integers(0, real.count, size=CHUNK)
        anchors = anchor_of_study[study_of]
        picks = np.argsort(rng.random((CHUNK, NEIGHBOURS)), axis=1)[:, : PARENTS - 1]
        study_parents = np.hstack(
            [anchor_of_study[:, None], real.neighbours[anchor_of_study[:, None], picks]]
        )
        parents = study_parents[study_of]
        study_weights = rng.dirichlet(np.full(PARENTS, ALPHA), size=CHUNK)
        spread = rng.standard_gamma(STUDY_SPREAD * study_weights[study_of] + 0.01)
        weights = (spread / spread.sum(axis=1, keepdims=True)).astype(np.float32)
        scale = np.exp(NOISE_SPREAD * rng.standard_normal(CHUNK)).astype(np.float32)[study_of]
        days_total = (DATE_LAST - DATE_FIRST).days + 1
        study_days = rng.integers(0, days_total, size=CHUNK)
        new_patient = rng.random(CHUNK) < 0.6  # about 1.7 studies a patient
        patient_of_study = np.cumsum(new_patient) - 1
        base = number * CHUNK
        vectors = {}
        for space in spaces:
            noise_rng = np.random.default_rng(
                [self.seed, self.stream, number, 1 + SPACES.index(space)]
            )
            x = real.vectors[space]
            out = np.zeros((size, x.shape[1]), dtype=np.float32)
            for j in range(PARENTS):
                out += weights[:size, j, None] * x[parents[:size, j]]
            shape = (CHUNK, len(real.noise_axes[space]))
            z = noise_rng.standard_normal(shape, dtype=np.float32)[:size]
            out += NOISE[space] * scale[:size, None] * (z @ real.noise_axes[space])
            out /= np.linalg.norm(out, axis=1, keepdims=True)
            vectors[space] = out
        return Chunk(
            first=base,
            vectors=vectors,
            anchors=anchors[:size],
            studies=base + study_of[:size],
            patients=base + patient_of_study[study_of[:size]],
            days=study_days[study_of[:size]],
        )

    def chunks(
        self, count: int, spaces: tuple[str, ...] = SPACES, start: int = 0
    ) -> Iterator[Chunk]:
        """The chunks of images start .. count - 1 (start a multiple of CHUNK)."""
        for number in range(start // CHUNK, (count + CHUNK - 1) // CHUNK):
            yield self.chunk(number, min(CHUNK, count - number * CHUNK), spaces)

    def vectors(self, count: int, space: str) -> np.ndarray:
        """The first `count` images' vectors of one space, in memory (small counts only)."""
        return np.vstack([c.vectors[space] for c in self.chunks(count, (space,))])


def metadata_rows(real: RealArchive, chunk: Chunk) -> Iterator[tuple]:
    """index.metadata.COLUMNS rows plus an empty thumbnail, already in the form index/write/
    rows.derive_fields leaves them (normalised modality column, body_part in the meta)."""
    for image_id, anchor, study, patient, day in zip(
        chunk.ids, chunk.anchors, chunk.studies, chunk.patients, chunk.days, strict=True
    ):
        label = real.labels[anchor]
        meta = {
            "dataset": label["dataset"],
            "body_part": label["body_part"],
            "study_id": f"S{study:09d}",
            "patient_id": f"P{patient:09d}",
            "study_date": (DATE_FIRST + datetime.timedelta(days=int(day))).isoformat(),
            "sex": label["sex"],
            "age": label["age"],
        }
        meta = {k: v for k, v in meta.items() if v is not None}
        yield (
            int(image_id),
            f"synthetic://{image_id}",
            str(image_id),
            "synthetic",
            f"{image_id:064x}",
            0,
            512,
            512,
            label["modality"],
            None,
            "",
            json.dumps(meta, sort_keys=True),
            b"",
        )
