"""Metadata at archive scale (issue 25, item 3), on a real small index of real images (the index of
tests/test_index_search.py): facets and per-field tables stored at publish give the answers the
row scans give; a start or reload checks headers and counts and still refuses a damaged file;
thumbnails live in thumbs.sqlite, and a version holding them inside meta.sqlite (written before)
still serves; group look-ups, filters, keyword search and images/{id} read indexes, never scan
every row (EXPLAIN QUERY PLAN). Speed is bench/metadata_scale.py's, not asserted here."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import test_index_search as search_tests

from index import layout, metadata
from index.errors import CorruptVersionError
from index.read import lookup
from index.read.facets import facets, offered, stored_facets
from index.read.filters import FieldTables, _number_sql, filter_sql
from index.read.store import open_current
from index.version import read_version
from index.write import lookups
from index.write import rows as written
from index.write.checks import verify
from index.write.compact import compact
from index.write.lookups import STORED_VALUES
from index.write.rewrite import remove

# the module fixtures of tests/test_index_search.py: the same real small index, built here
manifest_rows = search_tests.manifest_rows
index_root = search_tests.index_root
old_root = search_tests.old_root
store = search_tests.store


def version_of(root: Path) -> Path:
    return layout.current_version_dir(root)


def test_stored_facets_equal_a_scan_of_every_row(store):
    scanned = facets(store.db, store.meta_fields)
    stored = stored_facets(store.db)
    assert stored is not None and len(scanned) > 5
    cut = [
        (f.field, f.kind, f.distinct, f.count, f.low, f.high, f.values[:STORED_VALUES])
        for f in scanned
    ]
    assert [(f.field, f.kind, f.distinct, f.count, f.low, f.high, f.values) for f in stored] == cut
    assert store.facets(max_values=1000) == [f for f in stored]
    assert {f.kind for f in stored} == {"values", "range"}


@pytest.mark.parametrize(
    "show, hide",
    [
        (frozenset(), frozenset()),
        (frozenset({"dose", "image"}), frozenset()),
        (frozenset(), frozenset({"sex", "Study Date"})),
        (frozenset({"relpath"}), frozenset({"modality"})),
    ],
)
def test_the_offered_fields_are_the_same_stored_or_scanned(store, show, hide):
    """FACETS_SHOW / FACETS_HIDE (index.read.facets.offered) pick the same menus either way."""
    scanned = facets(store.db, store.meta_fields)
    offered_scanned = [f.field for f in scanned if offered(f, show, hide)]
    offered_stored = [f.field for f in store.facets() if offered(f, show, hide)]
    assert offered_stored == offered_scanned and offered_stored


def test_a_version_written_before_serves_the_same_facets_filters_groups_and_thumbnails(
    store, old_root, manifest_rows
):
    with open_current(old_root) as old:
        assert stored_facets(old.db) is None and lookup.stored_tables(old.db) is None
        assert old.facets(max_values=1000) == store.facets(max_values=1000)
        assert old.meta_fields == store.meta_fields
        for i in store.ids.tolist():
            assert old.thumbnail(i) == store.thumbnail(i) and store.thumbnail(i)[:2] == b"\xff\xd8"
        assert old.thumbnail(12345) is None and store.thumbnail(12345) is None
        sexes = sorted({r["sex"] for r in manifest_rows})
        ages = sorted({r["age"] for r in manifest_rows})[:4]
        dates = [r["study_date"] for r in manifest_rows[:3]]
        for field, keys in (("sex", sexes), ("age", ages), ("study_date", dates)):
            members = store.group_members(field, [*keys, "nobody"])
            assert members == old.group_members(field, [*keys, "nobody"])
            assert sum(map(len, members.values())) >= len(keys)
        for filters in ({"sex": sexes[0]}, {"age": {"gte": 30, "lte": 70}, "sex": sexes}):
            assert old.search("joint", old.vectors["joint"][0], old.count, filters) == store.search(
                "joint", store.vectors["joint"][0], store.count, filters
            )


def test_each_stored_field_table_holds_what_json_extract_returns(store):
    tables = lookup.stored_tables(store.db)
    assert set(tables) == store.meta_fields  # every field has a safe name here
    for field, table in tables.items():
        expected = store.db.execute(
            f"SELECT id, v, {_number_sql('v')} FROM (SELECT id, json_extract(meta, ?) AS v "
            "FROM images) WHERE v IS NOT NULL ORDER BY id",
            (f'$."{field}"',),
        ).fetchall()
        assert (
            store.db.execute(f"SELECT id, value, number FROM {table} ORDER BY id").fetchall()
            == expected
        )
        assert expected, field


def plan(db: sqlite3.Connection, sql: str, params: list) -> str:
    return "\n".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_lookups_read_indexes_never_every_row(store):
    """The queries of a group look-up, a filter, keyword search and images/{id}: no full SCAN of
    images (nor of a field table)."""
    db = store.db
    tables = FieldTables(db, lookup.stored_tables(db))
    sex = tables.table_of("sex")
    age = tables.table_of("age")
    joins = f" JOIN {sex} AS f0 ON f0.id = images.id JOIN {age} AS f1 ON f1.id = images.id"
    where, params = filter_sql(
        {"sex": "F", "age": {"gte": 30}},
        store.meta_fields,
        {"sex": ("f0.value", "f0.number"), "age": ("f1.value", "f1.number")},
    )
    queries = {
        "group": (f"SELECT value, id FROM {sex} WHERE value IN (?, ?) ORDER BY id", ["F", "M"]),
        "filter": (f"SELECT images.id FROM images{joins} WHERE {where}", params),
        "keywords": (
            "SELECT rowid FROM report_terms WHERE report_terms MATCH ?",
            ['{present} : "effusion"'],
        ),
        "row": (f"SELECT {', '.join(metadata.COLUMNS)} FROM images WHERE id IN (?)", [1]),
        "duplicates": ("SELECT path FROM duplicates WHERE id = ? ORDER BY path", [1]),
        "thumbnail": ("SELECT jpeg FROM thumbs.thumbnails WHERE id = ?", [1]),
    }
    for name, (sql, args) in queries.items():
        found = plan(db, sql, args)
        assert "SCAN images" not in found and "SCAN f0" not in found, (name, found)
        assert "SCAN field_" not in found and "SCAN thumbnails" not in found, (name, found)
    assert f"INDEX {sex.split('.')[-1]}_value" in plan(db, *queries["group"])
    assert "PRIMARY KEY" in plan(db, *queries["row"]) and "PRIMARY KEY" in plan(
        db, *queries["thumbnail"]
    )


def test_a_published_version_keeps_thumbnails_apart_and_checks_every_page_in_verify(index_root):
    version = version_of(index_root)
    assert (version / metadata.THUMBS_DB).is_file()
    with closing(metadata.open_readonly(version / metadata.META_DB)) as db:
        assert not metadata.has_column(db, "images", "thumbnail")
    result = verify(index_root)
    assert result.ok, result.problems
    assert result.checked["thumbnails"] == result.checked["metadata_rows"] > 0


def damaged_copy(root: Path, out: Path, damage) -> Path:
    import shutil

    shutil.copytree(root, out)
    damage(version_of(out))
    return out


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda v: os.truncate(v / "meta.sqlite", (v / "meta.sqlite").stat().st_size // 2),
            "meta.sqlite is damaged: meta.sqlite is truncated",
        ),
        (
            lambda v: os.truncate(v / "thumbs.sqlite", (v / "thumbs.sqlite").stat().st_size - 1000),
            "thumbs.sqlite is damaged: thumbs.sqlite is truncated",
        ),
        (
            lambda v: (v / "thumbs.sqlite").unlink(),
            "thumbs.sqlite is damaged: thumbs.sqlite cannot be read",
        ),
        (
            lambda v: (v / "meta.sqlite").write_bytes(b"not a database" * 1000),
            "meta.sqlite is damaged: meta.sqlite is not an SQLite database",
        ),
    ],
)
def test_a_damaged_metadata_file_is_refused_at_load_with_a_clear_error(
    index_root, tmp_path, damage, message
):
    root = damaged_copy(index_root, tmp_path / "root", damage)
    with pytest.raises(CorruptVersionError, match=message):
        open_current(root)


def test_a_write_from_an_old_version_moves_its_thumbnails_out(old_root, tmp_path, store):
    """A version holding thumbnails inside meta.sqlite (written before issue 25) serves on as one
    segment after a removal; compacting rewrites it with thumbs.sqlite and the stored tables,
    as `convirt index reindex` would."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(old_root, root)
    gone = int(store.ids[0])
    remove(root, ids=[gone])
    with open_current(root) as fresh:
        assert fresh.thumbnail(gone) is None and fresh.count == store.count - 1
        assert all(fresh.thumbnail(i) == store.thumbnail(i) for i in fresh.ids.tolist())
    compact(root)
    (segment,) = read_version(version_of(root)).segment_dirs
    assert (segment / metadata.THUMBS_DB).is_file()
    with closing(metadata.open_readonly(segment / metadata.META_DB)) as db:
        assert lookup.stored_tables(db)
        stored = stored_facets(db)
    with open_current(root) as fresh:
        assert fresh.thumbnail(gone) is None and fresh.count == store.count - 1
        assert all(fresh.thumbnail(i) == store.thumbnail(i) for i in fresh.ids.tolist())
        assert stored and fresh.facets() == stored


def test_facets_and_tables_stored_from_odd_json_equal_the_scan(tmp_path):
    """Values a facet does not count (JSON true, false, null, arrays, objects) beside text and
    numbers of the same field: the stored facets still equal the scan's, and each table holds
    what json_extract returns."""
    conn = written.create(tmp_path / metadata.META_DB)
    odd = [True, False, None, [1, 2], {"a": 1}, "1", 1, 1.5, "", "todo", "x", "2020-01-02"]
    rows = []
    for n in range(60):
        meta = {
            "mixed": odd[n % len(odd)],
            "flag": n % 2 == 0,
            "count": n % 7,
            "when": "2021-03-04",
        }
        values = {
            "id": n + 1, "path": f"/a/{n}.png", "relpath": f"{n}.png", "source": "/a",
            "sha256": f"{n:064x}", "size_bytes": 1, "width": 1, "height": 1,
            "modality": ["CT", "MR", None][n % 3], "view": None, "report": "",
            "meta": json.dumps(meta),
        }  # fmt: skip
        rows.append((*(values[c] for c in metadata.COLUMNS), b"jpeg"))
    written.insert_rows(conn, rows)
    conn.commit()
    lookups.write(conn)
    fields = lookup.meta_fields(conn)
    assert fields == {"mixed", "flag", "count", "when"}
    assert stored_facets(conn) == facets(conn, fields)
    for field, table in lookup.stored_tables(conn).items():
        expected = conn.execute(
            f"SELECT id, v, {_number_sql('v')} FROM (SELECT id, json_extract(meta, ?) AS v "
            "FROM images) WHERE v IS NOT NULL ORDER BY id",
            (f'$."{field}"',),
        ).fetchall()
        assert conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() == expected
    lookups.check(conn)  # the publish-time page check passes on a sound file
    conn.close()
