"""IndexStore.search, vectors_of and facets: filters (value, any-of, range), keywords over the
reports (SQLite FTS5), exclusions, on a real index of real shared-dataset images.

Every expectation is computed here in Python from the manifest the test writes, never hard-coded:
a wrong filter, a wrong stemmer setting or a wrong count fails.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import index_of_rows, written_before_issue_25

from convirt.findings import split_by_status
from convirt.sentences import split_sentences
from index import faiss_index
from index.errors import FilterError
from index.fields import derived_fields
from index.read.facets import Facet, is_placeholder
from index.read.filters import FILTER_COLUMNS, filtered_ids
from index.read.keywords import Keywords
from index.read.limits import MAX_ANY_OF, MAX_KEYWORD_CHARS, MAX_KEYWORDS
from index.read.store import open_current

FIELDS = ["image", "text", "modality", "view", "age", "sex", "study_date", "acquired", "dose"]
# A manifest field mixing numbers with text a CAST would read as a number ("12abc" -> 12,
# "n/a" -> 0): numeric ranges must skip them, and its facet is a list of values.
DOSES = ["1.5", "20", "n/a", "12abc", "", "0.25", "-3", "7"]
JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


# -- the archive: ~30 medpix and covid-cxr rows, absolute paths, nothing copied ------------------


def source_rows(datasets: Path, name: str) -> list[dict[str, str]]:
    with open(datasets / name / "manifest.csv", newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def pick(rows: list[dict[str, str]], first: int, patterns: list[tuple[str, int]]) -> list[dict]:
    """The first `first` rows, then the first n rows whose text matches each pattern."""
    picked = rows[:first]
    for pattern, n in patterns:
        matching = [r for r in rows if re.search(pattern, r["text"], re.I) and r not in picked]
        picked += matching[:n]
    return picked


@pytest.fixture(scope="module")
def manifest_rows(datasets) -> list[dict[str, str]]:
    medpix = pick(
        source_rows(datasets, "medpix"),
        12,
        [(r"\beffusions\b", 3), (r"\beffusion\b", 3), (r"\bpneumothorax\b", 2)],
    )
    covid = pick(
        source_rows(datasets, "covid-cxr"),
        6,
        [
            (r"\beffusion\b", 3),
            (r"\bpneumothorax\b", 1),
            (r"\b(small|large|moderate|bilateral)\s+(pleural\s+)?effusions?\b", 3),  # asserted
        ],
    )
    rows, seen = [], set()
    for name, source in (("medpix", medpix), ("covid-cxr", covid)):
        for r in source:
            image = os.path.normpath((datasets / name / r["image"]).absolute())
            digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()
            if digest in seen:  # the same content twice is indexed once: keep rows 1:1 with ids
                continue
            seen.add(digest)
            n = len(rows)
            day = date(2019, 1, 1) + timedelta(days=23 * n)
            rows.append(
                {
                    "image": image,
                    "text": r["text"],
                    "modality": r["modality"],
                    "view": r.get("view", ""),
                    "age": r["age"],
                    "sex": r["sex"],
                    "study_date": day.isoformat(),
                    "acquired": day.strftime("%Y%m%d"),
                    "dose": DOSES[n % len(DOSES)],
                }
            )
    return rows


@pytest.fixture(scope="module")
def index_root(tmp_path_factory, bundle_dir, manifest_rows) -> Path:
    return index_of_rows(tmp_path_factory.mktemp("search-index"), bundle_dir, manifest_rows, FIELDS)


@pytest.fixture(scope="module")
def old_root(tmp_path_factory, index_root) -> Path:
    """The same index as versions written before issue 25 hold it (no stored field tables)."""
    return written_before_issue_25(index_root, tmp_path_factory.mktemp("old") / "root")


@pytest.fixture(scope="module")
def store(index_root):
    with open_current(index_root) as opened:
        yield opened


@pytest.fixture(scope="module")
def id_of(store, manifest_rows) -> dict[str, int]:
    """Manifest image path -> index id."""
    paths = {row["path"]: i for i, row in store.get_many(store.ids.tolist()).items()}
    assert set(paths) == {r["image"] for r in manifest_rows}, "every row indexed, nothing else"
    return paths


def ids_where(manifest_rows, id_of, keep) -> set[int]:
    return {id_of[r["image"]] for r in manifest_rows if keep(r)}


def modality_of(row: dict[str, str]) -> str | None:
    """The modality the index stores for a manifest row (index/fields.py)."""
    return derived_fields(row)["modality"]


def number(text: str) -> float | None:
    return float(text) if JSON_NUMBER.fullmatch(text.strip()) else None


def query(store, space: str = "joint", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(store.info["dims"][space]).astype("f4")


def found(store, **options) -> set[int]:
    """The ids a search returns when k is the whole index: exactly the images that pass."""
    hits = store.search("joint", query(store), store.count, **options)
    ids = [hit.id for hit in hits]
    assert len(ids) == len(set(ids))
    return set(ids)


def brute_force(store, space: str, vector: np.ndarray, k: int, allowed: set[int]) -> list[int]:
    """The k best allowed ids by exact cosine similarity, computed here with numpy."""
    ids = [i for i in store.ids.tolist() if i in allowed]
    stored = store.vectors_of(ids, space)
    scores = stored @ (vector / np.linalg.norm(vector))
    return [ids[row] for row in np.argsort(-scores, kind="stable")[:k]]


def has_word(pattern: str):
    """Rows whose report asserts the pattern: keywords match what a report says is there
    (convirt.findings), so "No effusion." holds no effusion."""
    return lambda row: re.search(pattern, asserted(row["text"]), re.I) is not None


def mentions_word(pattern: str):
    return lambda row: re.search(pattern, row["text"], re.I) is not None


def asserted(report: str) -> str:
    return " . ".join(split_by_status(s)["present"] for s in split_sentences(report))


EFFUSION = r"\beffusions?\b"  # the only forms of the stem in these reports (checked below)


# -- search without restrictions is the old search -----------------------------------------------


def test_search_equals_the_batch_searches_and_similar_to_id(store, manifest_rows, id_of):
    assert store.count == len(manifest_rows) >= 28
    for seed in range(3):
        joint, encoder = query(store, "joint", seed), query(store, "encoder", seed)
        for k in (1, 5, store.count, store.count + 10):
            assert store.search("joint", joint, k) == store.search_text_vectors(joint[None], k)[0]
            assert (
                store.search("encoder", encoder, k)
                == store.search_image_vectors(encoder[None], k)[0]
            )
        hits = store.search("joint", joint, 7)
        assert [h.id for h in hits] == brute_force(store, "joint", joint, 7, set(id_of.values()))
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    first = int(store.ids[3])
    similar = store.similar_to_id(first, k=6)
    vector = store.vectors_of([first], "encoder")[0]
    assert [h.id for h in similar] == brute_force(
        store, "encoder", vector, 6, set(id_of.values()) - {first}
    )
    assert store.search("joint", query(store), 0) == []


def test_vectors_of(store):
    ids = [int(store.ids[5]), int(store.ids[0]), int(store.ids[5])]
    for space in ("joint", "encoder"):
        rows = store.vectors_of(ids, space)
        assert rows.shape == (3, store.info["dims"][space]) and rows.dtype == np.float32
        whole = np.asarray(store.vectors[space])
        assert np.array_equal(rows, whole[[5, 0, 5]])
        assert store.vectors_of([], space).shape == (0, store.info["dims"][space])
    missing = max(store.ids.tolist()) + 1
    with pytest.raises(KeyError, match=f"image id {missing} is not in index version"):
        store.vectors_of([int(store.ids[0]), missing, missing + 1], "joint")
    with pytest.raises(ValueError, match="space must be"):
        store.vectors_of(ids, "pixels")


def test_exclude(store, id_of):
    vector = query(store)
    top = [h.id for h in store.search("joint", vector, 5)]
    left_out = {top[0], top[2], 12345}  # an id the index does not hold is simply not there
    hits = store.search("joint", vector, 5, exclude=left_out)
    assert [h.id for h in hits] == brute_force(
        store, "joint", vector, 5, set(id_of.values()) - left_out
    )
    everything = store.search("joint", vector, 5, exclude=set(id_of.values()))
    assert everything == []
    with pytest.raises(FilterError, match="exclude holds image ids"):
        store.search("joint", vector, 5, exclude=["not an id"])


def test_a_wrong_vector_is_a_server_error_not_a_filter_error(store):
    for bad in (np.ones(7, np.float32), np.ones((2, store.info["dims"]["joint"]), np.float32)):
        with pytest.raises(ValueError) as caught:
            store.search("joint", bad, 5, filters={"sex": "F"})
        assert not isinstance(caught.value, FilterError)
    with pytest.raises(ValueError, match="space must be 'joint' or 'encoder'"):
        store.search("pixels", query(store), 5)


# -- filters --------------------------------------------------------------------------------------


def test_equality_and_any_of_filters(store, manifest_rows, id_of):
    def expect(keep):
        return ids_where(manifest_rows, id_of, keep)

    modality = modality_of(manifest_rows[0])  # the column holds the normalised modality
    assert found(store, filters={"modality": modality}) == expect(
        lambda r: modality_of(r) == modality
    )
    wanted = ["XR", modality, "no such modality"]
    by_any = found(store, filters={"modality": wanted})
    assert by_any == expect(lambda r: modality_of(r) in wanted)
    assert by_any > found(store, filters={"modality": modality})
    sexes = ("F", "male")
    assert found(store, filters={"sex": list(sexes)}) == expect(lambda r: r["sex"] in sexes)
    # manifest fields hold strings: numbers in a list match their text
    ages = [manifest_rows[0]["age"], int(manifest_rows[-1]["age"] or 40)]
    assert found(store, filters={"age": ages}) == expect(lambda r: r["age"] in map(str, ages))
    both = found(store, filters={"modality": wanted, "sex": list(sexes)})
    assert both == expect(lambda r: modality_of(r) in wanted and r["sex"] in sexes) != set()
    assert found(store, filters={"view": ["nothing", "at all"]}) == set()


def test_numeric_ranges_skip_values_that_are_not_numbers(store, manifest_rows, id_of):
    def between(field, low=None, high=None):
        def keep(row):
            value = number(row[field])
            return (
                value is not None
                and (low is None or value >= low)
                and (high is None or value <= high)
            )

        return ids_where(manifest_rows, id_of, keep)

    ages = sorted(number(r["age"]) for r in manifest_rows if number(r["age"]) is not None)
    low, high = ages[len(ages) // 4], ages[3 * len(ages) // 4]
    middle = found(store, filters={"age": {"gte": low, "lte": high}})
    assert middle == between("age", low, high) and 0 < len(middle) < store.count
    assert found(store, filters={"age": {"gte": low + 0.5}}) == between("age", low + 0.5)
    assert found(store, filters={"age": {"lte": int(high)}}) == between("age", None, high)
    assert found(store, filters={"age": {"gte": high, "lte": high}}) == between("age", high, high)
    # "n/a" and "12abc" would CAST to 0 and 12: they must not match
    doses = found(store, filters={"dose": {"gte": -1e9}})
    assert (
        doses
        == between("dose", -1e9)
        == ids_where(manifest_rows, id_of, lambda r: r["dose"] in {"1.5", "20", "0.25", "-3", "7"})
    )
    assert found(store, filters={"dose": {"gte": 0, "lte": 12}}) == between("dose", 0, 12)
    # a numeric range on a column: width is an INTEGER column
    widths = sorted(row["width"] for row in store.get_many(store.ids.tolist()).values())
    cut = widths[len(widths) // 2]
    assert len(found(store, filters={"width": {"gte": cut}})) == sum(w >= cut for w in widths)


def test_text_ranges_order_iso_dates(store, manifest_rows, id_of):
    dates = sorted(r["study_date"] for r in manifest_rows)
    low, high = dates[5], dates[-7]
    expected = ids_where(manifest_rows, id_of, lambda r: low <= r["study_date"] <= high)
    assert found(store, filters={"study_date": {"gte": low, "lte": high}}) == expected
    assert len(expected) == len(dates) - 5 - 6
    assert found(store, filters={"study_date": {"gte": low[:7]}}) == ids_where(
        manifest_rows, id_of, lambda r: r["study_date"] >= low[:7]
    )
    squashed = low.replace("-", "")
    assert found(store, filters={"acquired": {"lte": squashed}}) == ids_where(
        manifest_rows, id_of, lambda r: r["acquired"] <= squashed
    )


def test_filtered_search_ranks_like_exact_search_inside_faiss_and_by_overfetch(
    store, manifest_rows, id_of, monkeypatch
):
    filters = {"age": {"gte": 20}, "modality": ["XR", modality_of(manifest_rows[0])]}
    allowed = ids_where(
        manifest_rows,
        id_of,
        lambda r: (number(r["age"]) or 0) >= 20 and modality_of(r) in filters["modality"],
    )
    assert 3 < len(allowed) < store.count
    vector = query(store, seed=4)
    inside = store.search("joint", vector, 3, filters=filters)
    assert [h.id for h in inside] == brute_force(store, "joint", vector, 3, allowed)
    # structures FAISS cannot filter: fetch more and filter after, same answer
    monkeypatch.setattr(faiss_index, "search_params", lambda index, ids: None)
    assert store.search("joint", vector, 3, filters=filters) == inside
    assert len(store.search("joint", vector, 100, filters=filters)) == len(allowed)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"nope": "x"}, r"filter field 'nope' is not in this index; known: .*age.*study_date"),
        ({"a'); drop": 1}, r"filter field .* is not in this index"),
        ({"modality": []}, r"filter 'modality': the list of values is empty"),
        ({"modality": ["CT", ["MR"]]}, r"filter 'modality': a list item is a string, number"),
        ({"sex": [{"gte": 1}]}, r"filter 'sex': a list item is a string, number or boolean"),
        ({"sex": {"CT"}}, r"filter 'sex': a value is a string, number or boolean, not set"),
        ({"modality": ["CT"] * (MAX_ANY_OF + 1)}, rf"a list holds at most {MAX_ANY_OF}"),
        ({"age": {}}, r"filter 'age': a range is .*but this one is empty"),
        ({"age": {"gt": 4, "lte": 9}}, r"filter 'age': a range is .*but this one has 'gt'"),
        ({"age": {"gte": 60, "lte": 40}}, r"filter 'age': the range is empty \(gte 60 is above"),
        ({"study_date": {"gte": "2020", "lte": "2019"}}, r"the range is empty"),
        ({"age": {"gte": 4, "lte": "9"}}, r"the bounds are a number and a string"),
        ({"age": {"gte": True}}, r"filter 'age': gte is a number or a string .*not bool"),
        ({"age": {"lte": [1, 2]}}, r"filter 'age': lte is a number or a string .*not list"),
        ({"age": {"gte": float("nan")}}, r"gte must be a finite number"),
        ({"modality": 2**70}, r"filter value out of range"),
    ],
)
def test_filters_the_index_cannot_run_raise_filter_error(store, filters, message):
    with pytest.raises(FilterError, match=message) as caught:
        store.search("joint", query(store), 5, filters=filters)
    assert isinstance(caught.value, ValueError)  # old callers catch ValueError


# -- keywords -------------------------------------------------------------------------------------


def test_keywords_must_and_must_not_with_stemming(store, manifest_rows, id_of):
    texts = " ".join(r["text"] for r in manifest_rows)
    # guards: the Python expectations below hold only if these are the stem's forms here
    assert {w.lower() for w in re.findall(r"\w*effus\w*", texts, re.I)} == {
        "effusion",
        "effusions",
    }
    singular = ids_where(manifest_rows, id_of, has_word(r"\beffusion\b"))
    plural = ids_where(manifest_rows, id_of, has_word(r"\beffusions\b"))
    assert singular - plural and plural - singular, "both forms, each alone somewhere"
    effusion = ids_where(manifest_rows, id_of, has_word(EFFUSION))
    denied = ids_where(manifest_rows, id_of, mentions_word(EFFUSION)) - effusion
    assert denied and effusion, "reports that deny an effusion, and reports that assert one"
    for term in ("effusion", "effusions", "EFFUSION", "Effusions."):
        assert found(store, keywords=Keywords(must=(term,))) == effusion, term
    everyone = set(id_of.values())
    assert found(store, keywords=Keywords(must_not=("effusion",))) == everyone - effusion
    phrase = ids_where(manifest_rows, id_of, has_word(r"\bpleural\W+effusions?\b"))
    assert 0 < len(phrase) < len(effusion)
    assert found(store, keywords=Keywords(must=("pleural effusion",))) == phrase
    pneumothorax = ids_where(manifest_rows, id_of, has_word(r"\bpneumothorax\b"))
    mixed = Keywords(must=("effusion", "pleural"), must_not=("pneumothorax", "no such word"))
    assert found(store, keywords=mixed) == (
        effusion & ids_where(manifest_rows, id_of, has_word(r"\bpleural\b")) - pneumothorax
    )
    assert found(store, keywords=Keywords(must="pleural effusion")) == phrase  # a bare string
    assert found(store, keywords=Keywords()) == everyone  # no terms: no restriction


def test_keyword_terms_are_text_never_fts_syntax(store, manifest_rows, id_of):
    effusion = ids_where(manifest_rows, id_of, has_word(EFFUSION))
    pleural = ids_where(manifest_rows, id_of, has_word(r"\bpleural\b"))
    assert pleural
    cases = {
        'pleural "effusion': has_word(r"\bpleural\W+effusions?\b"),  # a quote inside
        'effusion" OR "normal': has_word(r"\beffusions?\W+or\W+normal\b"),  # not an OR
        "NEAR(effusion": has_word(r"\bnear\W+effusions?\b"),  # not NEAR()
        "effusion*": has_word(EFFUSION),  # * is punctuation here
        "pleur*": has_word(r"\bpleur\b"),  # not a prefix query: "pleural" does not match
        "effusion NOT pleural": has_word(r"\beffusions?\W+not\W+pleural\b"),
        "reports:effusion": has_word(r"\breports?\W+effusions?\b"),  # not a column filter
        "^effusion": has_word(EFFUSION),
    }
    for term, keep in cases.items():
        assert found(store, keywords=Keywords(must=(term,))) == ids_where(
            manifest_rows, id_of, keep
        ), term
    assert found(store, keywords=Keywords(must=("pleur*",))) == set() != pleural
    assert found(store, keywords=Keywords(must=("effusion*",))) == effusion


def test_keywords_filters_and_exclude_together(store, manifest_rows, id_of):
    effusion = ids_where(manifest_rows, id_of, has_word(EFFUSION))
    xray = ids_where(manifest_rows, id_of, lambda r: modality_of(r) == "XR")
    left_out = set(list(sorted(effusion & xray))[:1])
    expected = (effusion & xray) - left_out
    assert expected
    vector = query(store, seed=9)
    hits = store.search(
        "joint",
        vector,
        4,
        filters={"modality": "XR"},
        keywords=Keywords(must=("effusions",)),
        exclude=left_out,
    )
    assert [h.id for h in hits] == brute_force(store, "joint", vector, 4, expected)
    assert (
        store.search(
            "joint", vector, 4, filters={"modality": "none"}, keywords=Keywords(("effusion",))
        )
        == []
    )


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        (Keywords(must=("   ",)), r"keywords must: a term is blank"),
        (Keywords(must_not=("",)), r"keywords must_not: a term is blank"),
        (
            Keywords(must=("x" * (MAX_KEYWORD_CHARS + 1),)),
            rf"a term of {MAX_KEYWORD_CHARS + 1} characters; at most {MAX_KEYWORD_CHARS}",
        ),
        (
            Keywords(must=("a",) * 10, must_not=("b",) * (MAX_KEYWORDS - 9)),
            rf"{MAX_KEYWORDS + 1} keywords: at most {MAX_KEYWORDS} terms",
        ),
        (Keywords(must=('"*"',)), r"keywords must: '\"\*\"' has no letter or digit"),
        (Keywords(must=(3,)), r"keywords must: a term is a string, not int"),
        (Keywords(must_not=("\ud800",)), r"is not valid Unicode"),
    ],
)
def test_keywords_the_index_cannot_run_raise_filter_error(store, keywords, message):
    with pytest.raises(FilterError, match=message):
        store.search("joint", query(store), 5, keywords=keywords)


def test_the_report_index_is_built_once_across_threads_and_the_version_is_untouched(
    index_root, manifest_rows, id_of
):
    meta = next((index_root / "versions").glob("*/meta.sqlite"))
    before = hashlib.sha256(meta.read_bytes()).hexdigest()
    expected = ids_where(manifest_rows, id_of, has_word(EFFUSION))
    with open_current(index_root) as fresh:  # no report index yet
        keywords = Keywords(must=("effusion",))
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: found(fresh, keywords=keywords), range(16)))
        assert all(result == expected for result in results)
        built = fresh._reports
        assert found(fresh, keywords=keywords) == expected and fresh._reports is built
    assert hashlib.sha256(meta.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("layout", ["published", "before issue 25"])
def test_field_tables_find_what_the_json_scan_finds_built_once_per_field(
    index_root, old_root, manifest_rows, layout
):
    """Filters on manifest fields read per-field tables (index.read.filters.FieldTables): those
    the version was published with, or, in versions written before them, temporary ones built
    on first use; they must pass exactly the rows that parsing each row's JSON passes."""
    root = index_root if layout == "published" else old_root
    meta = next((root / "versions").glob("*/meta.sqlite"))
    before = hashlib.sha256(meta.read_bytes()).hexdigest()
    dates = sorted(r["study_date"] for r in manifest_rows)
    cases = [
        {"sex": manifest_rows[0]["sex"]},
        {"sex": ["F", "male", "nobody"], "modality": modality_of(manifest_rows[0])},
        {"age": [manifest_rows[1]["age"], 40]},
        {"age": {"gte": 30, "lte": 70}},
        {"dose": {"gte": -1e9}},  # "n/a", "12abc" and "" are not numbers: never in a range
        {"dose": {"lte": "5"}},  # a text range over the same values
        {"dose": ""},  # empty values are not stored: nothing matches either way
        {"study_date": {"gte": dates[3], "lte": dates[-4]}, "sex": ["M", "F", "male", "female"]},
        {"acquired": {"lte": dates[8].replace("-", "")}, "age": {"gte": 1}},
        {"age": {"gte": 30}, "width": {"gte": 1}},  # a manifest field and a column
    ]
    with open_current(root) as fresh:
        scanned = [set(filtered_ids(fresh.db, filters, fresh.meta_fields)) for filters in cases]
        with ThreadPoolExecutor(4) as pool:  # first uses race: each table is built once
            results = list(pool.map(lambda f: found(fresh, filters=f), cases * 3))
        assert results == scanned * 3
        assert 0 < len(scanned[3]) < fresh.count and scanned[4] and scanned[7] and scanned[8]
        used = {key for filters in cases for key in filters} - FILTER_COLUMNS
        built = set() if layout == "published" else used  # nothing built where stored
        assert set(fresh._field_tables.tables) == built
        assert used <= set(fresh._field_tables.stored) or layout != "published"
    assert hashlib.sha256(meta.read_bytes()).hexdigest() == before  # temporary tables only


def test_filters_read_the_json_when_no_field_table_can_be_built(
    old_root, manifest_rows, id_of, caplog
):
    """A version written before the stored field tables, served where SQLite's temporary
    storage is full."""
    with open_current(old_root) as fresh:
        fresh.db.execute("PRAGMA temp.max_page_count = 1")  # SQLite's temporary storage is full
        sex = manifest_rows[0]["sex"]
        with caplog.at_level("WARNING", logger="index.read.filters"):
            passing = found(fresh, filters={"sex": sex, "age": {"gte": 1}})
        assert passing == ids_where(
            manifest_rows, id_of, lambda r: r["sex"] == sex and (number(r["age"]) or 0) >= 1
        )
        assert "filtering without field tables" in caplog.text
        assert fresh._field_tables.tables == {}
        assert fresh.db.execute("SELECT name FROM sqlite_temp_master").fetchall() == []
        assert set(fresh._field_tables.failed) == {"sex"}  # the first build failed; none after
        caplog.clear()
        with caplog.at_level("WARNING", logger="index.read.filters"):
            assert found(fresh, filters={"sex": sex, "age": {"gte": 1}}) == passing
        assert caplog.records == []  # not tried (nor logged) again


# -- facets ---------------------------------------------------------------------------------------


def expected_facets(manifest_rows) -> dict[str, dict]:
    """Per field: the kind, counts, and range or ranked values, by the rules facets follow."""
    fields = ["modality", "view", *sorted(set(FIELDS) - {"image", "text", "modality", "view"})]
    fields.insert(fields.index("sex"), "modality_original")  # index.fields keeps the original
    rows = [
        {**r, "modality": modality_of(r), "modality_original": r["modality"]} for r in manifest_rows
    ]
    out = {}
    for field in fields:
        # placeholders ("n/a") are no value, as empty ones
        counts = Counter(r[field] for r in rows if r[field] != "" and not is_placeholder(r[field]))
        if not counts:
            continue
        texts = list(counts)
        expected = {"distinct": len(counts), "count": sum(counts.values())}
        dates = [
            all(re.fullmatch(pattern, t) for t in texts)
            for pattern in (r"\d{4}-\d{2}-\d{2}", r"\d{8}")
        ]
        if any(dates):
            expected.update(kind="range", low=min(texts), high=max(texts), values=[])
        elif all(number(t) is not None for t in texts):
            numbers = [number(t) for t in texts]
            expected.update(kind="range", low=min(numbers), high=max(numbers), values=[])
        else:
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            expected.update(kind="values", low=None, high=None, values=ranked)
        out[field] = expected
    return out


def test_facets_match_the_manifest(store, manifest_rows):
    expected = expected_facets(manifest_rows)
    facets = store.facets(max_values=1000)
    assert [f.field for f in facets] == list(expected)
    kinds = {f.field: f.kind for f in facets}
    assert kinds["age"] == kinds["study_date"] == kinds["acquired"] == "range"
    assert kinds["dose"] == kinds["sex"] == kinds["modality"] == "values"
    for facet in facets:
        want = expected[facet.field]
        assert isinstance(facet, Facet)
        assert (facet.kind, facet.distinct, facet.count) == (
            want["kind"],
            want["distinct"],
            want["count"],
        ), facet.field
        assert (facet.low, facet.high, facet.values) == (
            want["low"],
            want["high"],
            want["values"],
        ), facet.field
    assert isinstance(next(f for f in facets if f.field == "age").low, float)
    assert isinstance(next(f for f in facets if f.field == "acquired").low, str)


def test_facets_are_cut_to_max_values_and_cached(store, manifest_rows):
    full = {f.field: f for f in store.facets(max_values=1000)}
    cut = {f.field: f for f in store.facets(max_values=2)}
    for field, facet in full.items():
        assert cut[field].values == facet.values[:2]
        assert (cut[field].distinct, cut[field].count) == (facet.distinct, facet.count)
    assert len(full["modality_original"].values) > 2 and len(store.facets()[0].values) <= 50
    store.facets(max_values=1000)[0].values.clear()  # a caller's copy: the cache keeps its own
    assert store.facets(max_values=1000)[0] == full["modality"]
    assert store._facets is not None and store.facets(max_values=0)[0].values == []
    with pytest.raises(ValueError, match="max_values"):
        store.facets(max_values=-1)
