"""Reports kept in the database (``reports``, ``report_files``) so they can be served over HTTP
(``meltica reports serve``, :mod:`meltica.reporting.server`) instead of linked on a worker's disk.

A report is a set of named files (``report.html`` and the PNGs it shows, ...), written once under its id
(a backtest's run id) and never changed: storing it again is a no-op. File names are plain names (letters,
digits, ``.``, ``_``, ``-``; no ``/``), so a URL can name a file but never a path.
"""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert

from meltica.errors import DataValidationError
from meltica.storage.errors import storage_errors
from meltica.storage.tables import report_files, reports

__all__ = [
    "StoredFile",
    "StoredReport",
    "content_type_of",
    "is_plain_name",
    "list_reports",
    "read_report_file",
    "report_file_names",
    "report_url",
    "store_report",
    "store_report_directory",
]

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Served types; anything else is sent as bytes to download.
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
    ".csv": "text/csv; charset=utf-8",
    ".md": "text/plain; charset=utf-8",  # shown by the browser, not downloaded
}


def is_plain_name(name: str) -> bool:
    """A file name a report may hold: no directory part, no leading dot, at most 128 characters."""
    return bool(_PLAIN_NAME.match(name)) and ".." not in name


def content_type_of(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


@dataclass(frozen=True, slots=True)
class StoredFile:
    name: str
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class StoredReport:
    report_id: uuid.UUID
    kind: str
    title: str
    created_at: datetime
    files: tuple[str, ...]


def store_report(engine: Engine, report_id: uuid.UUID, kind: str, title: str, files: Mapping[str, bytes]) -> bool:
    """Store ``files`` (name → bytes) as report ``report_id`` in one transaction; False (nothing written) when
    the report is already stored."""
    bad = [name for name in files if not is_plain_name(name)]
    if bad:
        raise DataValidationError(f"report file names must be plain names, got {bad!r}", reason="bad_report_file")
    if not files:
        raise DataValidationError("a report needs at least one file", reason="bad_report_file")
    with storage_errors(engine, "storing a report"), engine.begin() as conn:
        created = conn.execute(
            insert(reports)
            .values(report_id=report_id, kind=kind, title=title)
            .on_conflict_do_nothing(index_elements=["report_id"])
            .returning(reports.c.report_id)
        ).first()
        if created is None:
            return False
        conn.execute(
            report_files.insert(),
            [
                {"report_id": report_id, "name": name, "content_type": content_type_of(name), "body": body}
                for name, body in files.items()
            ],
        )
    return True


def store_report_directory(
    engine: Engine, report_id: uuid.UUID, kind: str, title: str, directory: Path, names: Iterable[str]
) -> bool:
    """Store the files ``names`` of ``directory`` that exist as report ``report_id`` (see :func:`store_report`)."""
    files = {name: (directory / name).read_bytes() for name in names if (directory / name).is_file()}
    return store_report(engine, report_id, kind, title, files)


def report_file_names(engine: Engine, report_id: uuid.UUID) -> tuple[str, ...]:
    """The names of the stored files of ``report_id`` (empty when no such report is stored)."""
    with storage_errors(engine, "reading a report"), engine.connect() as conn:
        rows = conn.execute(
            select(report_files.c.name).where(report_files.c.report_id == report_id).order_by(report_files.c.name)
        )
        return tuple(row.name for row in rows)


def read_report_file(engine: Engine, report_id: uuid.UUID, name: str) -> StoredFile | None:
    """One stored file of a report, or None when the report or the file is not stored."""
    if not is_plain_name(name):
        return None
    with storage_errors(engine, "reading a report"), engine.connect() as conn:
        row = conn.execute(
            select(report_files.c.content_type, report_files.c.body).where(
                report_files.c.report_id == report_id, report_files.c.name == name
            )
        ).first()
    return None if row is None else StoredFile(name, row.content_type, bytes(row.body))


def list_reports(engine: Engine, limit: int = 100) -> list[StoredReport]:
    """The newest ``limit`` stored reports with their file names."""
    with storage_errors(engine, "listing reports"), engine.connect() as conn:
        heads = conn.execute(select(reports).order_by(reports.c.created_at.desc()).limit(limit)).all()
        names: dict[uuid.UUID, list[str]] = {}
        if heads:
            for row in conn.execute(
                select(report_files.c.report_id, report_files.c.name)
                .where(report_files.c.report_id.in_([h.report_id for h in heads]))
                .order_by(report_files.c.name)
            ):
                names.setdefault(row.report_id, []).append(row.name)
    return [StoredReport(h.report_id, h.kind, h.title, h.created_at, tuple(names.get(h.report_id, ()))) for h in heads]


def report_url(base_url: str, report_id: uuid.UUID, name: str = "report.html") -> str:
    """The URL of a stored report's file under ``base_url`` (the ``reports_url`` setting)."""
    return f"{base_url.rstrip('/')}/reports/{report_id}/{name}"
