"""What adding 1% more images and one compaction cost at archive scale (issue 25, item 4), what
a query served meanwhile sees, and the base version's start-up and facets.

    python bench/segment_writes.py --size 100k            # a smoke run
    python bench/segment_writes.py --size 1M --folder /big/disk --json writes.json

Everything goes through index/write as `convirt index build`, `add` and `compact` run it, minus
the embedding: vectors come from bench/archive_vectors.py's generator (both spaces, fitted to
--root), so a write's time is exactly the target's "beyond the time to embed them".

  base        writing(root, "build"): rows as bench/metadata_scale.py synthesises them (DICOM
              fields, a 12-word report a study, a 3.2 KB thumbnail) via rows.insert_rows into
              w.meta, then w.publish(vectors, ids, ...) with --index-type (format 1)
  add 1%      writing(root, "add", from_current=True) doing what build.update does once its
              images are embedded: its look-ups of the current segments (live content, paths,
              ids, touched segments), rows into w.meta, w.publish(..., as_segment=True) with
              segments.segment_index_type's choice, segments.publish_listing; then
              compact.by_policy, as `add` runs it. Timed from the lock to the policy's answer
  compaction  compact.compact(root): every segment merged into one
(bytes written: every file under ROOT that was not there before the write).

Each write runs in a child process, as the CLI runs beside the server (in the server's process
its Python work would hold the GIL and the queries would measure that). Meanwhile one thread
serves single queries back to back (held-out generated images: joint, encoder, and joint under
{"modality": "CT"}, 1/8 of the rows; k=10) from a service.search.stores.StoreSlot, and another
polls CURRENT every RELOAD_POLL_S and swaps the new version in as the service's reload does
(opened first; requests in flight finish on the old one). An error is an exception or an empty
answer. A phase lasts until its version is served (its p99 includes the reload); the quiet
baseline is the same thread before the add. On a 2-core box the writer, the query thread and
the reloader share both cores (with the box's other jobs): a p99 "during" is the scheduler's as
much as the index's.

Approximated: report sentences get random unit vectors (embedding: their time is subtracted);
the staging area that embedding writes (~10 KB an image) and removes after publishing is not
counted; the files are warm in the page cache. A size whose disk (DISK_PER_IMAGE x DISK_COPIES)
or write-path RAM (RAM_PER_IMAGE) does not fit is refused. Files are removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import archive_vectors as synthetic
import faiss
import numpy as np
from archive_scale import available_ram, parse_size
from common import percentiles_ms
from metadata_scale import synthetic_row

from index import layout
from index.read.store import IndexStore, open_current
from index.write import compact, rows, segments
from index.write.template import writing
from service.search.stores import StoreSlot

ADD_SHARE = 0.01
THUMBNAIL_BYTES = 3200  # the demo's mean thumbnail (bench/metadata_scale.py's default)
RELOAD_POLL_S = 0.2
QUIET_S = 20.0  # the quiet baseline's length
K = 10
# disk bytes an image of the base version (measured at 100k, compressed: 9,733; flat and hnsw
# keep float32 .npy files and FAISS's copy instead of float16: ~10.7 KB more, estimated)
DISK_PER_IMAGE = {"compressed": 9_800, "hnsw": 21_000, "flat": 20_500, "auto": 21_000}
DISK_COPIES = 2.2  # base + the compacted copy + the 1% segment, with slack
# peak RSS an image of the writing processes (measured at 100k, compressed: base build 36 KB,
# compaction 37 KB, above the ~0.9 GB of the imports and the fit: ~5x the float32 vectors)
RAM_PER_IMAGE = 37_000
QUERY_KINDS = (("joint", "joint", None), ("encoder", "encoder", None))
QUERY_KINDS += (("joint CT", "joint", {"modality": "CT"}),)  # kind, space, filters
WRITES = ("add 1%", "compaction")
BASE_INFO = {  # what `build` records of its model and source
    "fingerprint": "synthetic-archive", "source": {"kind": "synthetic", "location": "synthetic://"},
    "model": {"path": None, "image_encoder": "synthetic", "image_size": 0}, "shard": None,
    "ram_budget": None, "embed_seconds": 0.0, "skipped": 0, "duplicates": 0,
}  # fmt: skip


class TextVectors:
    """Report sentences -> random unit vectors, timed (that time is embedding, subtracted)."""

    def __init__(self, dim: int):
        self.dim, self.seconds, self.count = dim, 0.0, 0

    def __call__(self, texts) -> np.ndarray:
        started = time.perf_counter()
        x = np.random.default_rng(self.count).standard_normal((len(texts), self.dim), np.float32)
        self.count += len(texts)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        self.seconds += time.perf_counter() - started
        return x


def metadata_rows(first: int, count: int, thumbnail: int) -> list[tuple]:
    """Rows of images first .. first + count - 1 (ids first + 1 ...), bench/metadata_scale.py's."""
    rng = random.Random(first)
    return [synthetic_row(n, rng, thumbnail) for n in range(first, first + count)]


def added_images(generator, first: int, count: int, thumbnail: int):
    """Images first .. first + count - 1: (metadata rows, ids, space -> float32 vectors)."""
    parts = {space: [] for space in synthetic.SPACES}
    start = first // synthetic.CHUNK * synthetic.CHUNK
    for chunk in generator.chunks(first + count, start=start):
        for space in synthetic.SPACES:
            parts[space].append(chunk.vectors[space][chunk.ids > first])
    vectors = {space: np.concatenate(p) for space, p in parts.items()}
    ids = np.arange(first + 1, first + count + 1, dtype=np.int64)
    return metadata_rows(first, count, thumbnail), ids, vectors


def write_base(root: Path, generator, count: int, args, text: TextVectors) -> float:
    """A format-1 version, as `convirt index build` publishes one (rows generated chunk by chunk
    into w.meta, every vector held in memory as build holds them); its seconds, generating the
    rows included, embedding the sentences not."""
    outcome = {"counts": {"embedded": count}, "skipped": [], "duplicates": []}
    dims = {space: generator.real.vectors[space].shape[1] for space in synthetic.SPACES}
    vectors = {space: np.zeros((count, dim), np.float32) for space, dim in dims.items()}
    started, embedded = time.perf_counter(), text.seconds
    with writing(root, "build") as w:
        w.embed_texts = text
        for chunk in generator.chunks(count):
            first, size = chunk.first, len(chunk.ids)
            for space in synthetic.SPACES:
                vectors[space][first : first + size] = chunk.vectors[space]
            rows.insert_rows(w.meta, metadata_rows(first, size, args.thumbnail_bytes))
        ids = np.arange(1, count + 1, dtype=np.int64)
        w.publish(vectors, ids, BASE_INFO, outcome, args.index_type)
    return time.perf_counter() - started - (text.seconds - embedded)


def add_segment(root: Path, new_rows: list[tuple], ids, vectors, text: TextVectors) -> None:
    """build.update's writes once its images are embedded (nothing replaced, nothing dropped),
    then the compaction policy, as `convirt index add` runs them."""
    with writing(root, "add", from_current=True) as w:
        listing = segments.Listing.of(w.current)
        w.reuse_from = [f.directory for f in listing.files]
        w.embed_texts = text
        known = listing.live_content()  # run_job looks each image up: already indexed?
        assert not any(row[4] in known for row in new_rows)
        paths = [row[1] for row in new_rows]
        listing.ids_of_paths(paths)  # images stored under these paths (replaced)
        touched = listing.holding(ids) | listing.with_paths(rows.SKIPPED_TABLE, paths)
        assert not touched
        rows.insert_rows(w.meta, new_rows)
        info = {**segments.segment_info(w.current), "added_from": {"kind": "synthetic"}}
        outcome = {"counts": {"embedded": len(ids)}, "added": paths}
        kind = segments.segment_index_type(w.current.info.get("index_type"), len(ids))
        segment = w.publish(vectors, ids, info, outcome, kind, as_segment=True)
        segments.publish_listing(w, listing, touched, segment, [], info, outcome)
    compact.by_policy(root)


class Service:
    """One query thread on a StoreSlot and one reload poller, as service/state.py serves."""

    def __init__(self, root: Path, store: IndexStore, queries: list[tuple]):
        self.root, self.slot, self.queries = root, StoreSlot(store), queries
        self.phase = "starting"
        self.latencies: dict[tuple[str, str], list[float]] = {}  # (phase, query kind) -> s
        self.errors: dict[tuple[str, str], list[str]] = {}  # (phase, query kind or "reload")
        self.reloads: list[dict] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.serve, self.poll)]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.slot.close()

    def serve(self) -> None:
        n = 0
        while not self.stop.is_set():
            kind, space, vector, filters = self.queries[n % len(self.queries)]
            n += 1
            key = (self.phase, kind)
            started = time.perf_counter()
            try:
                with self.slot.lease() as store:
                    hits = store.search(space, vector, K, filters)
                if not hits:
                    raise RuntimeError(f"no hits from version {store.version}")
            except Exception as err:  # what a served request would have answered 500 for
                self.errors.setdefault(key, []).append(f"{type(err).__name__}: {err}")
                continue
            self.latencies.setdefault(key, []).append(time.perf_counter() - started)

    def poll(self) -> None:
        while not self.stop.wait(RELOAD_POLL_S):
            try:
                if not self.slot.current.has_newer_version():
                    continue
                started = time.perf_counter()
                new = open_current(self.root)
                self.slot.swap(new)
                seconds = round(time.perf_counter() - started, 3)
                self.reloads.append({"version": new.version, "images": new.count, "s": seconds})
            except Exception as err:
                self.errors.setdefault((self.phase, "reload"), []).append(repr(err))

    def serving(self, version: str, timeout: float = 600.0) -> None:
        """Wait until the slot serves `version` (the reload that follows a publish)."""
        deadline = time.monotonic() + timeout
        while self.slot.current.version != version and time.monotonic() < deadline:
            time.sleep(0.05)

    def rows(self) -> list[dict]:
        """p50/p99 and errors per phase, every query kind together, then each kind's."""
        kinds = [kind for kind, _, _ in QUERY_KINDS]
        found, quiet_p99 = [], None
        for phase in ("quiet", *WRITES):
            times = [t for kind in kinds for t in self.latencies.get((phase, kind), [])]
            row = {"step": f"queries: {phase}", "queries": len(times), **percentiles_ms(times, 2)}
            row["errors"] = sum(len(v) for (p, _), v in self.errors.items() if p == phase)
            quiet_p99 = quiet_p99 or row["p99_ms"]
            if row["p99_ms"] and quiet_p99:
                row["p99_x_quiet"] = round(row["p99_ms"] / quiet_p99, 2)
            for kind in kinds:
                one = percentiles_ms(self.latencies.get((phase, kind), []), 2)
                errors = len(self.errors.get((phase, kind), []))
                row[kind] = f"{one['p50_ms']}/{one['p99_ms']} ms, {errors} errors"
            found.append(row)
        return found


def write_in_child(pipe, step: str, root: Path, args, count: int, added: int) -> None:
    """One write (WRITES) in its own process, as `convirt index add` / `compact` run beside the
    server: its inputs made first, then "ready"; on "go", the write, timed; then its figures."""
    faiss.omp_set_num_threads(1)
    text = TextVectors(0)  # a compaction embeds nothing: every sentence is reused
    if step == WRITES[0]:
        generator = synthetic.Generator(synthetic.fit(args.root), args.seed)
        new_rows, ids, vectors = added_images(generator, count, added, args.thumbnail_bytes)
        text = TextVectors(vectors["joint"].shape[1])
    inputs = peak_rss()
    pipe.send("ready")
    pipe.recv()
    started = time.perf_counter()
    if step == WRITES[0]:
        add_segment(root, new_rows, ids, vectors, text)
    else:
        compact.compact(root)
    seconds = time.perf_counter() - started - text.seconds
    pipe.send(
        {"s": round(seconds, 2), "embed_s_subtracted": round(text.seconds, 3),
         "writer_peak_rss": peak_rss(), "writer_rss_inputs": inputs}
    )  # fmt: skip


class Writer:
    """A write's child process (spawned: no fork of a process running threads), ready to go."""

    def __init__(self, step: str, root: Path, args, count: int, added: int):
        context = multiprocessing.get_context("spawn")
        self.step = step
        self.pipe, theirs = context.Pipe()
        self.child = context.Process(
            target=write_in_child, args=(theirs, step, root, args, count, added), daemon=True
        )
        self.child.start()
        if self.pipe.recv() != "ready":
            raise SystemExit(f"{step}: the writer did not start")

    def run(self, root: Path, service: Service) -> dict:
        """The write while `service` serves, until the new version is served; what it wrote."""
        before = tree_files(root)
        service.phase = self.step
        self.pipe.send("go")
        done = self.pipe.recv()
        service.serving(layout.read_current(root))
        service.phase = f"after {self.step}"
        self.child.join()
        return {**done, "bytes": sum(tree_files(root, before).values())}


def tree_files(root: Path, before: dict[str, int] | None = None) -> dict[str, int]:
    """path -> bytes of the files under root (those not in `before`)."""
    found = {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    return {path: size for path, size in found.items() if path not in (before or {})}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        found = dict(line.split(":", 1) for line in status)
    return int(found["VmHWM"].split()[0]) * 1024


def refuse_if_too_big(count: int, folder: Path, index_type: str) -> None:
    disk, ram = int(count * DISK_PER_IMAGE[index_type] * DISK_COPIES), count * RAM_PER_IMAGE
    free, available = shutil.disk_usage(folder).free, available_ram()
    need = f"~{disk / 1e9:.1f} GB disk ({free / 1e9:.1f} GB free in {folder}: the base version, "
    need += f"the 1% segment, the compacted copy), ~{ram / 1e9:.1f} GB RAM ({available / 1e9:.1f}"
    need += " GB available: publish and compaction hold every vector as float32)"
    print(f"{count:,} images, {index_type}: needs {need}")
    short = [
        name for name, over in (("disk", disk > 0.9 * free), ("RAM", ram > 0.9 * available)) if over
    ]
    if short:
        raise SystemExit(f"refused, not enough {' or '.join(short)}: {count:,} images need {need}")


def run(args) -> list[dict]:
    count = parse_size(args.size)
    added = max(1, round(count * ADD_SHARE))
    refuse_if_too_big(count, Path(args.folder or tempfile.gettempdir()), args.index_type)
    real = synthetic.fit(args.root)
    generator = synthetic.Generator(real, args.seed)
    held_out = synthetic.Generator(real, args.seed, stream=synthetic.QUERY_STREAM).chunk(0, 100)
    queries = [
        (kind, space, held_out.vectors[space][i], filters)
        for i in range(100)
        for kind, space, filters in QUERY_KINDS
    ]
    folder = Path(tempfile.mkdtemp(prefix=f"segment-writes-{count}-", dir=args.folder))
    root = folder / "index"
    results: list[dict] = []
    service = None
    try:
        rss = peak_rss()
        base_s = write_base(root, generator, count, args, TextVectors(512))
        base_dir = layout.current_version_dir(root)
        base_bytes = layout.tree_bytes(base_dir)
        factory = json.loads((base_dir / "version.json").read_text()).get("factory")
        print(f"base version {factory}: {base_s:.0f} s, {base_bytes / 1e6:.0f} MB")
        base = {"step": "base version", "images": count, "s": round(base_s, 1)}
        results.append(base | {"bytes": base_bytes, "peak_rss": peak_rss(), "rss_at_start": rss})
        started = time.perf_counter()
        store = open_current(root)
        opened = time.perf_counter()
        store.facets()
        facets_ms = round((time.perf_counter() - opened) * 1000, 2)
        results.append({"step": "start-up (open_current)", "s": round(opened - started, 3)})
        results.append({"step": "store.facets() (first)", "ms": facets_ms})
        service = Service(root, store, queries)
        writers = [Writer(step, root, args, count, added) for step in WRITES]
        service.phase = "quiet"
        time.sleep(args.quiet_seconds)
        for writer in writers:
            done = writer.run(root, service)
            images = added if writer.step == WRITES[0] else count + added
            share = round(done["bytes"] / base_bytes, 4)
            results.append({"step": writer.step, "images": images, **done, "of_base": share})
        time.sleep(1.0)
    finally:
        if service is not None:
            service.close()
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder)
    results += service.rows()
    results += [{"step": f"reload to {r['version']}", **r} for r in service.reloads]
    for (phase, kind), errors in service.errors.items():
        print(f"errors ({phase}, {kind}): {len(errors)}, first: {errors[0]}")
    return results


def print_table(results: list[dict]) -> None:
    for row in results:
        cells = [f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in row.items()]
        print(f"  {row['step']:28s} {', '.join(cells[1:])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo-index-cpu"))
    parser.add_argument("--size", default="1M", help="images in the base version (smoke: 100k)")
    parser.add_argument("--index-type", default="compressed", choices=sorted(DISK_PER_IMAGE))
    parser.add_argument("--thumbnail-bytes", type=int, default=THUMBNAIL_BYTES)
    parser.add_argument("--quiet-seconds", type=float, default=QUIET_S)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, help="where the index is written (a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the index root")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs; one FAISS thread; generator fitted to {args.root}")
    results = run(args)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
