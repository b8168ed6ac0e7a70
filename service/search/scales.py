"""The score scales of the served index version (calibration.py says what they mean), computed once
per version in a background thread, never on a query's path.

The thread starts with the Searcher and whenever a search meets a version not calibrated yet (a
reload); it leases the served version (so a reload cannot close it underneath), calibrates it
and looks again, until the served version is done. It runs niced, faiss single-threaded. Until a
kind is done its results answer `match` null: for the tests' 41-image index that is well under
a second after start; the demo's 5,456 images took 6 s (image) and 50 s (the five text kinds,
text_dense first, in a second or two) of one niced core on the 2-core dev box while it also ran
tests (about 10 s in all when idle).

Sampling (SAMPLE queries of each source, a fixed seed, so a version always gets the same scale):
- image: indexed images' encoder vectors, each searching the encoder space, itself left out;
- text: report sentences that assert something, their vectors searching the joint space
  (text_dense), and ranked as a text query is (index.read.hybrid, one ranking per sentence; the
  report-only and rrf scores fused from the same evidence), the images whose report holds the
  sentence left out.
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

from index.read.hybrid import fuse
from index.read.sentences import dot
from index.read.store import IndexStore
from service.model.explain_worker import lower_priority

from . import calibration
from .calibration import Scale
from .stores import StoreSlot

log = logging.getLogger("service")

SAMPLE = 200
SEED = 0
TOP = 10
NICE = 10
KEPT_VERSIONS = 2  # the served version's scales and the one before (requests still on it)


class Stopped(Exception):
    pass


class Scales:
    def __init__(self, stores: StoreSlot):
        self.stores = stores
        self.scales: dict[str, dict[str, Scale]] = {}  # version -> kind -> scale (as they finish)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def of(self, version: str, kind: str) -> Scale | None:
        """The scale of a kind on a version; None while it is computed (one is started then)."""
        with self.lock:
            found = self.scales.get(version)
        if found is None:
            self.refresh()
            return None
        return found.get(kind)

    def all(self, version: str) -> dict[str, Scale]:
        with self.lock:
            found = self.scales.get(version)
        if found is None:
            self.refresh()
        return dict(found or {})

    def refresh(self) -> None:
        """Calibrate the served version in the background, unless that is being done."""
        with self.lock:
            if self.stopping.is_set() or (self.thread is not None and self.thread.is_alive()):
                return
            self.thread = threading.Thread(target=self._run, name="calibration", daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        faiss.omp_set_num_threads(1)
        lower_priority(NICE)
        while not self.stopping.is_set():
            with self.stores.lease() as store:
                with self.lock:
                    if store.version in self.scales:
                        return
                    self.scales[store.version] = {}
                    while len(self.scales) > KEPT_VERSIONS:
                        del self.scales[next(iter(self.scales))]
                try:
                    self._calibrate(store)
                except Stopped:
                    return
                except Exception as err:  # a scale is a hint: never a failed service
                    log.warning("scores of index version %s not calibrated: %s", store.version, err)

    def _calibrate(self, store: IndexStore) -> None:
        rng = np.random.default_rng(SEED)
        self._publish(store.version, image_scale(store, rng, self._check))
        for scale in text_scales(store, rng, self._check):
            self._publish(store.version, scale)
        log.info("scores of index version %s calibrated", store.version)

    def _publish(self, version: str, scale: Scale | None) -> None:
        if scale is not None:
            with self.lock:
                self.scales.setdefault(version, {})[scale.kind] = scale

    def _check(self) -> None:
        if self.stopping.is_set():
            raise Stopped


def image_scale(store: IndexStore, rng: np.random.Generator, check) -> Scale | None:
    if store.count <= TOP:
        return None
    rows = rng.choice(store.count, min(SAMPLE, store.count), replace=False)
    best, tenth = [], []
    for row in rows:
        check()
        image_id = int(store.ids[row])
        hits = store.search("encoder", store.vectors["encoder"][row], TOP, exclude={image_id})
        if len(hits) == TOP:
            best.append(hits[0].score)
            tenth.append(hits[-1].score)
    return calibration.scale_of(calibration.IMAGE, np.array(best), np.array(tenth))


def text_scales(store: IndexStore, rng: np.random.Generator, check) -> list[Scale | None]:
    """text_dense first (cheap), then the ranked kinds, from SAMPLE report sentences."""
    space = store.sentences
    if space is None or store.count <= TOP:
        return []
    asserting = np.flatnonzero(space.asserts)
    if len(asserting) == 0:
        return []
    picked = rng.choice(asserting, min(SAMPLE, len(asserting)), replace=False)
    kinds = {kind: ([], []) for kind in calibration.KINDS if kind != calibration.IMAGE}
    dense = kinds.pop(calibration.TEXT_DENSE)
    for sentence in picked:
        check()
        own = set(space.images_of(sentence).tolist())
        scores = [h.score for h in store.search("joint", space.vectors[sentence], TOP, exclude=own)]
        _add(dense, np.array(scores))
    found = [calibration.scale_of(calibration.TEXT_DENSE, *map(np.array, dense))]
    for sentence in picked:
        check()
        own = set(space.images_of(sentence).tolist())
        ranking = store.rank_text(space.vectors[sentence], space.texts[sentence], TOP, exclude=own)
        if ranking is None:
            return found
        for mode in ("hybrid", "report"):
            for fusion in ("weighted", "rrf"):
                kind = calibration.text_kind(mode, fusion)
                _add(kinds[kind], fused_top(ranking, mode, fusion))
    found += [calibration.scale_of(kind, *map(np.array, pair)) for kind, pair in kinds.items()]
    return found


def fused_top(ranking, mode: str, fusion: str) -> np.ndarray:
    """The TOP best scores a text query ranked by `mode` and `fusion` gets, fused from a hybrid
    ranking's evidence (index.read.hybrid.TextRanking; report mode reads only the images with
    report evidence, as its own ranking does)."""
    ids = ranking.reports.images if mode == "report" else ranking.candidates
    if len(ids) == 0:
        return np.zeros(0)
    image_scores = dot(ranking.joint(ids.tolist()), ranking.query)
    fused = fuse(ids, image_scores, ranking.reports, ranking.reported, mode, fusion)
    if mode != "hybrid":
        fused = fused[fused > 0]
    return np.round(np.sort(fused)[::-1][:TOP], 6)


def _add(pair: tuple[list, list], scores: np.ndarray) -> None:
    if len(scores) >= TOP:
        pair[0].append(float(scores[0]))
        pair[1].append(float(scores[TOP - 1]))
