"""The report text of PACS images: a RIS report table (CSV) joined by StudyInstanceUID or
AccessionNumber, and the TextValue items of Structured Reports. Apart from the
downloads because neither needs the network."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .http import DicomwebError

REPORT_KEY_COLUMNS = {
    "study": ("studyinstanceuid", "studyuid", "study"),
    "accession": ("accessionnumber", "accession"),
}
REPORT_TEXT_COLUMNS = ("report", "text", "reporttext")


@dataclass
class ReportTable:
    """A RIS report table: report text by StudyInstanceUID and/or AccessionNumber."""

    path: Path
    by_study: dict[str, str] = field(default_factory=dict)
    by_accession: dict[str, str] = field(default_factory=dict)
    rows: int = 0

    @classmethod
    def read(cls, path: Path) -> ReportTable:
        if not path.is_file():
            raise DicomwebError(f"--reports {path}: no such file")
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            columns = {_plain(name): name for name in reader.fieldnames or []}
            keys = {
                kind: next((columns[c] for c in names if c in columns), None)
                for kind, names in REPORT_KEY_COLUMNS.items()
            }
            text = next((columns[c] for c in REPORT_TEXT_COLUMNS if c in columns), None)
            if text is None or not any(keys.values()):
                raise DicomwebError(
                    f"--reports {path}: needs a StudyInstanceUID or AccessionNumber column and "
                    f"a report (or text) column; it has {', '.join(reader.fieldnames or []) or 'none'}"
                )
            table = cls(path)
            for row in reader:
                report = " ".join((row.get(text) or "").split())
                if not report:
                    continue
                table.rows += 1
                if keys["study"] and (row.get(keys["study"]) or "").strip():
                    table.by_study[row[keys["study"]].strip()] = report
                elif keys["accession"] and (row.get(keys["accession"]) or "").strip():
                    table.by_accession[row[keys["accession"]].strip()] = report
        return table

    def report(self, study: str, accession: str) -> str:
        return self.by_study.get(study) or (self.by_accession.get(accession) if accession else "")

    def unknown(self, studies: set[str], accessions: set[str]) -> list[str]:
        """Keys of rows that name no study the PACS listed or the index holds."""
        missing = [uid for uid in self.by_study if uid not in studies]
        missing += [number for number in self.by_accession if number not in accessions]
        return sorted(missing)


def _plain(name: str) -> str:
    return name.lower().replace("_", "").replace(" ", "")


def sr_text(dataset) -> str:
    """The TextValue content items of a Structured Report, in document order, joined."""
    texts: list[str] = []

    def walk(items) -> None:
        for item in items:
            value = item.get("TextValue")
            if value:
                texts.append(" ".join(str(value).split()))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dataset.get("ContentSequence") or [])
    return " ".join(t for t in texts if t)
