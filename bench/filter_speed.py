"""Filtered search at archive scale: the ids passing a filter, by parsing every row's metadata
JSON (the baseline) against FieldTables (a field's indexed table, built on its first filter).

The metadata database has the index's own schema (index.metadata) and N synthetic rows whose
manifest fields look like a hospital archive's (body part, sex, age, a study date, a case id;
modality is a column; an empty thumbnail), so no images and no model are needed. Both ways run on the same
read-only connection kind the server opens, in the same run, each filter `--repeats` times;
the table build is timed apart (it happens once per field and index version). Every filter
must find the same ids both ways, or the run stops. Last, the look-up sync makes per study
(images under a path prefix): a scan of every row against the path index. Prints JSON.

    python bench/filter_speed.py                      # 200,000 rows
    python bench/filter_speed.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from index import metadata
from index.read.filters import FILTER_COLUMNS, FieldTables, filtered_ids
from index.read.lookup import meta_fields
from index.write import rows as written

MODALITIES = ("XR", "CT", "MR", "US", "NM", "PT")
BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", "SPINE", "PELVIS", "KNEE", "HAND", "NECK")
FILTERS = {
    "one value": {"body_part": "HEAD"},
    "any of + column": {"body_part": ["KNEE", "HAND"], "modality": "XR"},
    "number range": {"age": {"gte": 40, "lte": 60}},
    "date range + value": {"study_date": {"gte": "2021-01-01", "lte": "2021-03-31"}, "sex": "male"},
    "one case": {"case_id": "case-000123"},
}


def write_database(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    conn = written.create(path)

    def row(n: int) -> tuple:
        meta = {
            "body_part": rng.choice(BODY_PARTS),
            "sex": rng.choice(("female", "male")),
            "age": str(rng.randint(0, 95)),
            "study_date": f"20{rng.randint(15, 24)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "case_id": f"case-{n // 4:06d}",
        }
        values = {
            "id": n + 1,
            "path": f"/archive/{n}.png",
            "relpath": f"{n}.png",
            "source": "/archive",
            "sha256": f"{n:064x}",
            "size_bytes": 1000,
            "width": 512,
            "height": 512,
            "modality": rng.choice(MODALITIES),  # a column (indexed) in every version
            "view": None,
            "report": "",
            "meta": json.dumps(meta),
        }
        return (*(values[column] for column in metadata.COLUMNS), b"")

    written.insert_rows(conn, (row(n) for n in range(rows)))
    conn.commit()
    conn.close()


def timed(run, repeats: int) -> tuple[float, list[int]]:
    times, found = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        found = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), found


def prefix_lookups(conn, repeats: int) -> dict:
    """The images under a path prefix, as `convirt index sync` asks once per study: the scan it
    ran before (substr on every row) against written.paths_under (a range on the path index)."""
    prefixes = [f"/archive/{n}" for n in range(1000, 1050)]  # 111 images each at 200k rows

    def scan() -> list[int]:
        sql = "SELECT id FROM images WHERE substr(path, 1, ?) = ?"
        return [i for p in prefixes for (i,) in conn.execute(sql, (len(p), p))]

    def indexed() -> list[int]:
        return [i for p in prefixes for i in written.paths_under(conn, p)[0].values()]

    scan_ms, scanned = timed(scan, repeats)
    index_ms, found = timed(indexed, repeats)
    if sorted(scanned) != sorted(found):
        raise SystemExit("prefix look-up: the two ways found different ids")
    return {
        "images": len(found),
        "row_scan_ms_per_study": round(scan_ms / len(prefixes), 3),
        "path_index_ms_per_study": round(index_ms / len(prefixes), 3),
        "speedup": round(scan_ms / index_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="images in the database")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each filter, each way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metadata.sqlite"
        write_database(path, args.rows)
        conn = metadata.open_readonly(path)
        fields = meta_fields(conn)
        tables = FieldTables(conn)
        builds = {}
        for key in sorted({key for f in FILTERS.values() for key in f} - FILTER_COLUMNS):
            started = time.perf_counter()
            tables.table_of(key)
            builds[key] = round((time.perf_counter() - started) * 1000, 1)
        results = {}
        for name, filters in FILTERS.items():
            scan_ms, scanned = timed(lambda f=filters: filtered_ids(conn, f, fields), args.repeats)
            table_ms, indexed = timed(
                lambda f=filters: filtered_ids(conn, f, fields, tables), args.repeats
            )
            if sorted(scanned) != sorted(indexed):
                raise SystemExit(f"{name}: the two ways found different ids")
            results[name] = {
                "matches": len(indexed),
                "json_scan_ms": round(scan_ms, 2),
                "field_tables_ms": round(table_ms, 2),
                "speedup": round(scan_ms / table_ms, 1),
            }
        prefixes = prefix_lookups(conn, args.repeats)
        conn.close()
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "rows": args.rows,
                "repeats": args.repeats,
                "table_build_ms": builds,
                "filters": results,
                "sync_prefix_lookup": prefixes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
