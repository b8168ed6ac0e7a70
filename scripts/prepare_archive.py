"""Prepare the demo archive: one manifest over the shared datasets, for `convirt index build`.

The archive folder gets a symlink per dataset (never a copy: the data's licences forbid
redistribution) and a manifest.csv whose image paths run through those links, so results show
short paths such as medpix/images/MPX1009_synpic46283.jpg, with each image's report text and a
few metadata columns. Writing the same manifest again leaves the file untouched, so an index
built from it can be recognised as up to date.

    python scripts/prepare_archive.py --out runs/demo-archive
    python scripts/prepare_archive.py --out /tmp/archive --limit 20   # a small archive for tests
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from convirt.manifest import ManifestError, read_manifest_rows
from convirt.paths import data_root

# dataset -> manifest columns kept as metadata (shown beside each result, offered as filters).
# case_id, patient_id and pmc_article name a study or patient: the service groups results by them.
# Modality and body part are kept as each dataset spells them (medpix's `type` and `location`
# too): the index normalises them to one vocabulary (index/fields.py), so `{"modality": "CT"}`
# finds the CTs of all four; covid-cxr and covid-ct are chest imaging by their `dataset`.
DATASETS = {
    "medpix": [
        "type", "modality", "plane", "location", "location_category", "diagnosis", "case_id",
        "sex", "age",
    ],
    "covid-cxr": ["modality", "view", "finding", "patient_id", "sex", "age", "licence"],
    # chest CT slices cut from preprint figures (README: research use, no redistribution)
    "covid-ct": ["modality", "finding", "patient_id", "sex", "age"],
    # PubMed Central figures: each keeps its article and Creative Commons licence beside it.
    "roco": ["modality_keyword", "pmc_article", "licence"],
}  # fmt: skip
# archive column -> the other spelling some datasets use for it (covid-cxr's `license`)
SPELT_AS = {"licence": "license"}
# covid-cxr writes sex as M/F, medpix as male/female: one spelling, so one filter finds both
SPELLING = {"sex": {"M": "male", "F": "female"}}
METADATA = sorted({column for columns in DATASETS.values() for column in columns})
COLUMNS = ["image", "text", "dataset", "split", *METADATA]


def archive_rows(root: Path, limit: int | None) -> list[dict[str, str]]:
    rows = []
    for dataset, kept in DATASETS.items():
        manifest = root / dataset / "manifest.csv"
        if not manifest.is_file():
            raise SystemExit(
                f"prepare_archive: no {manifest}; set CONVIRT_DATA_ROOT to the folder holding "
                f"{', '.join(DATASETS)}"
            )
        try:
            source = read_manifest_rows(manifest)
        except ManifestError as err:
            raise SystemExit(f"prepare_archive: {err}") from err
        for row in source[:limit]:
            kept_fields = {
                column: row.get(column, row.get(SPELT_AS.get(column, ""), "")).strip()
                for column in kept
            }
            for column, spellings in SPELLING.items():
                if column in kept_fields:
                    kept_fields[column] = spellings.get(kept_fields[column], kept_fields[column])
            rows.append(
                {
                    "image": f"{dataset}/{row['image']}",
                    "text": row.get("text", ""),
                    "dataset": dataset,
                    "split": row.get("split", ""),
                    **kept_fields,
                }
            )
    return rows


def link_datasets(root: Path, out: Path) -> None:
    for dataset in DATASETS:
        link = out / dataset
        target = (root / dataset).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise SystemExit(f"prepare_archive: {link} exists and is not a link; remove it")
        link.symlink_to(target, target_is_directory=True)


def write_if_changed(path: Path, rows: list[dict[str, str]]) -> bool:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="archive folder (created)")
    parser.add_argument(
        "--data-root", type=Path, help="datasets folder (default: $CONVIRT_DATA_ROOT)"
    )
    parser.add_argument("--limit", type=int, help="first N rows of each dataset only")
    args = parser.parse_args(argv)
    root = (args.data_root or data_root()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = archive_rows(root, args.limit)
    link_datasets(root, args.out)
    changed = write_if_changed(args.out / "manifest.csv", rows)
    state = "written" if changed else "unchanged"
    print(f"archive: {len(rows)} images from {root} -> {args.out / 'manifest.csv'} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
