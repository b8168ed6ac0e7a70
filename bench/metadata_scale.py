"""Metadata at archive scale (issue 25, item 3): what a server pays at start, on /v1/facets, on
the first filter on a field, on a group look-up and on /v1/images/{id}, before and after the
facets and field tables were written at publish and the thumbnails moved out of meta.sqlite.

One synthetic archive of N images is written twice, the way index/write does: once in today's
layout (index.write.rows: meta.sqlite without thumbnails, thumbs.sqlite beside it; the normalised
fields derived; the lookup tables and quick_check of index/write/lookups.py at publish, timed),
and once in the layout before (the thumbnail a column of images, nothing stored). The rows look
like a PACS's (DICOM names: PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
AccessionNumber, StudyDate, BodyPartExamined, ViewPosition, Modality; age, sex, a manufacturer;
a report), thumbnails are random bytes of a real thumbnail's size. Each operation runs both
ways in this one process on read-only connections of the kind a server opens, and both ways
must give the same answer or the run stops. Timings are warm (the files in the page cache).

    python bench/metadata_scale.py                    # 1,000,000 images
    python bench/metadata_scale.py --rows 200000 --thumbnail-bytes 3200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from index import metadata
from index.read import lookup
from index.read.facets import facets, stored_facets
from index.read.filters import FieldTables, filtered_ids
from index.read.opening import header_problem
from index.write import lookups
from index.write import rows as written

MODALITIES = ("CR", "DX", "CT", "MR", "US", "NM", "PT", "MG")
BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", "SPINE", "PELVIS", "KNEE", "HAND", "NECK", "BREAST")
MAKERS = ("GE", "SIEMENS", "PHILIPS", "CANON", "FUJI", "AGFA")
WORDS = [
    "no",
    "pleural",
    "effusion",
    "small",
    "opacity",
    "right",
    "lower",
    "lobe",
    "stable",
    "cardiomegaly",
    "fracture",
]
IMAGES_PER_SERIES, SERIES_PER_STUDY, STUDIES_PER_PATIENT = 4, 3, 3
OLD_SCHEMA = metadata.SCHEMA.replace(
    "meta TEXT NOT NULL DEFAULT '{}'\n",
    "meta TEXT NOT NULL DEFAULT '{}',\n    thumbnail BLOB NOT NULL\n",
)


def synthetic_row(n: int, rng: random.Random, thumbnail_bytes: int) -> tuple:
    series = n // IMAGES_PER_SERIES
    study = series // SERIES_PER_STUDY
    patient = study // STUDIES_PER_PATIENT
    srng = random.Random(study)  # a study's fields are the same for all its images
    modality = srng.choice(MODALITIES)
    meta = {
        "PatientID": f"P{patient:08d}",
        "StudyInstanceUID": f"1.2.840.99.{study}",
        "SeriesInstanceUID": f"1.2.840.99.{study}.{series}",
        "SOPInstanceUID": f"1.2.840.99.{study}.{series}.{n}",
        "AccessionNumber": f"A{study:09d}",
        "StudyDate": f"20{srng.randint(12, 24)}{srng.randint(1, 12):02d}{srng.randint(1, 28):02d}",
        "Modality": modality,
        "BodyPartExamined": srng.choice(BODY_PARTS),
        "ViewPosition": rng.choice(("PA", "AP", "LAT", "")),
        "age": str(srng.randint(0, 95)),
        "sex": srng.choice(("F", "M")),
        "Manufacturer": srng.choice(MAKERS),
    }
    report = " ".join(srng.choice(WORDS) for _ in range(12)) + "."
    values = {
        "id": n + 1,
        "path": f"dicomweb://pacs/studies/{study}/series/{series}/instances/{n}",
        "relpath": f"{study}/{series}/{n}",
        "source": "dicomweb://pacs",
        "sha256": f"{n:064x}",
        "size_bytes": 524288,
        "width": 512,
        "height": 512,
        "modality": modality,
        "view": meta["ViewPosition"] or None,
        "report": report,
        "meta": json.dumps(meta, sort_keys=True),
    }
    return (*(values[c] for c in metadata.COLUMNS), rng.randbytes(thumbnail_bytes))


def write_versions(folder: Path, count: int, thumbnail_bytes: int) -> dict[str, float]:
    """Today's version (folder/new) and the layout before (folder/old); seconds of each step."""
    seconds: dict[str, float] = {}
    (folder / "new").mkdir()
    (folder / "old").mkdir()
    new = written.create(folder / "new" / metadata.META_DB)
    old = sqlite3.connect(folder / "old" / metadata.META_DB)
    old.executescript(OLD_SCHEMA)
    marks = ", ".join("?" * (len(metadata.COLUMNS) + 1))
    rng = random.Random(0)
    started = time.perf_counter()
    batch: list[tuple] = []
    for n in range(count):
        batch.append(synthetic_row(n, rng, thumbnail_bytes))
        if len(batch) == 10_000 or n == count - 1:
            written.insert_rows(new, batch)
            old.executemany(f"INSERT INTO images VALUES ({marks})", batch)
            batch = []
    new.commit()
    old.commit()
    seconds["rows_both_layouts_s"] = time.perf_counter() - started
    for name, step in (
        ("derive_fields_s", written.derive_fields),
        ("publish_lookup_tables_s", lookups.write),
        ("publish_quick_check_s", lookups.check),
    ):
        started = time.perf_counter()
        step(new)
        seconds[name] = time.perf_counter() - started
    new.close()
    started = time.perf_counter()
    written.derive_fields(old)  # the same rows as the new layout's, for equal answers
    seconds["derive_fields_old_s"] = time.perf_counter() - started
    old.close()
    return {name: round(value, 2) for name, value in seconds.items()}


def timed(run, repeats: int = 1) -> tuple[float, object]:
    """(median ms, the last result) of `repeats` runs."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def compare(name: str, before, after, results: dict, repeats: int = 1) -> None:
    before_ms, expected = timed(before, repeats)
    after_ms, got = timed(after, repeats)
    if expected != got:
        raise SystemExit(f"{name}: the two ways disagree")
    results[name] = {
        "before_ms": round(before_ms, 2),
        "after_ms": round(after_ms, 3),
        "ratio": round(before_ms / max(after_ms, 1e-6), 1),
    }


def summary(found) -> list[tuple]:
    """What /v1/facets answers of each facet (at most 50 values a field)."""
    return [(f.field, f.kind, f.distinct, f.count, f.low, f.high, f.values[:50]) for f in found]


def start_check_old(path: Path) -> int:
    """What a start or reload ran before: quick_check (every page), then the count."""
    conn = metadata.open_readonly(path)
    try:
        assert [r[0] for r in conn.execute("PRAGMA quick_check")] == ["ok"]
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        conn.close()


def start_check_new(path: Path) -> int:
    """What it runs now (index/read/opening.py): headers, schema, the count."""
    assert header_problem(path) is None
    assert header_problem(path.parent / metadata.THUMBS_DB) is None
    conn = metadata.open_readonly(path)
    try:
        metadata.attach_thumbnails(conn, path.parent / metadata.THUMBS_DB)
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        conn.close()


def measure(folder: Path, count: int) -> dict:
    old_path, new_path = folder / "old" / metadata.META_DB, folder / "new" / metadata.META_DB
    results: dict = {}
    compare(
        "start_or_reload_check",
        lambda: start_check_old(old_path),
        lambda: start_check_new(new_path),
        results,
    )
    old, new = metadata.open_readonly(old_path), metadata.open_readonly(new_path)
    metadata.attach_thumbnails(new, new_path.parent / metadata.THUMBS_DB)
    compare(
        "meta_fields_at_open",
        lambda: lookup.meta_fields(old),
        lambda: lookup.meta_fields(new),
        results,
    )
    fields = lookup.meta_fields(new)
    compare(
        "facets_first_request",
        lambda: summary(facets(old, fields)),
        lambda: summary(stored_facets(new)),
        results,
    )
    old_tables, new_tables = FieldTables(old), FieldTables(new, lookup.stored_tables(new))
    first = {"BodyPartExamined": "KNEE", "age": {"gte": 40, "lte": 45}}
    compare(
        "first_filter_on_two_fields",
        lambda: sorted(filtered_ids(old, first, fields, old_tables)),
        lambda: sorted(filtered_ids(new, first, fields, new_tables)),
        results,
    )
    for name, filters in (
        ("filter_one_study", {"StudyInstanceUID": "1.2.840.99.4242"}),
        (
            "filter_date_range_and_sex",
            {"StudyDate": {"gte": "20200101", "lte": "20200131"}, "sex": "F"},
        ),
    ):
        compare(
            name,
            lambda f=filters: sorted(filtered_ids(old, f, fields, old_tables)),
            lambda f=filters: sorted(filtered_ids(new, f, fields, new_tables)),
            results,
            repeats=5,
        )
    studies = [f"1.2.840.99.{s}" for s in random.Random(1).sample(range(count // 12), 10)]
    table = lookup.stored_tables(new)["StudyInstanceUID"]
    groups: dict = {}

    def scan_groups() -> dict:  # the first group look-up on a field before: one scan, then a map
        groups.update(lookup.field_values(old, "StudyInstanceUID"))
        return {key: groups[key] for key in studies if key in groups}

    compare("group_lookup_first", scan_groups, lambda: lookup.members(new, table, studies), results)
    ids = [int(i) for i in random.Random(2).sample(range(1, count + 1), 20)]
    compare(
        "image_by_id_row_and_thumbnail_x20",
        lambda: [
            (lookup.get_rows(old, [i])[i].path, lookup.thumbnail(old, i, apart=False)) for i in ids
        ],
        lambda: [(lookup.get_rows(new, [i])[i].path, lookup.thumbnail(new, i)) for i in ids],
        results,
        repeats=5,
    )
    old.close()
    new.close()
    sizes = {
        "old_meta_sqlite_bytes": old_path.stat().st_size,
        "new_meta_sqlite_bytes": new_path.stat().st_size,
        "new_thumbs_sqlite_bytes": (new_path.parent / metadata.THUMBS_DB).stat().st_size,
    }
    return {"operations": results, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="images in the archive")
    parser.add_argument("--thumbnail-bytes", type=int, default=3200, help="the demo's mean: 3.2 KB")
    parser.add_argument("--folder", type=Path, default=None, help="where to write (a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        writes = write_versions(Path(tmp), args.rows, args.thumbnail_bytes)
        measured = measure(Path(tmp), args.rows)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, SQLite {sqlite3.sqlite_version}",
                "rows": args.rows,
                "thumbnail_bytes": args.thumbnail_bytes,
                "write_seconds": writes,
                **measured,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
