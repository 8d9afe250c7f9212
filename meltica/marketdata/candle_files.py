"""Reading candle files (CSV, optionally gzipped; Feather; Parquet) into validated rows.

The whole file is read and checked before anything is stored, so a malformed row is reported with its
line number and nothing of the file is half-loaded.

Accepted columns (case-insensitive): a time column named ``timestamp``, ``date``, ``time``, ``ts``
or ``open_time``, and ``open``, ``high``, ``low``, ``close``, ``volume``; other columns are ignored.
Times are ISO-8601 (a time without an offset is taken as UTC) or integer epoch milliseconds.
CSV prices are parsed from their text straight to ``Decimal`` (exact); Feather/Parquet floats are
converted through their shortest round-trip representation.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from meltica.domain.timeframe import Timeframe
from meltica.errors import DataValidationError

TIME_COLUMNS = ("timestamp", "date", "time", "ts", "open_time")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CandleRow:
    """One validated bar as read from a file; ``line`` is its 1-based line (CSV) or row number."""

    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    line: int


@dataclass(frozen=True)
class CandleFile:
    path: Path
    rows: list[CandleRow]

    @property
    def start(self) -> datetime | None:
        return self.rows[0].ts if self.rows else None

    @property
    def end(self) -> datetime | None:
        return self.rows[-1].ts if self.rows else None


def read_candle_file(path: Path | str, timeframe: Timeframe | str) -> CandleFile:
    """Read, parse and validate every row of ``path``; raise on the first malformed one."""
    path = Path(path)
    tf = parse_timeframe(timeframe) if isinstance(timeframe, str) else timeframe
    if not path.is_file():
        raise DataValidationError(f"{path}: no such file", source=str(path))
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".feather"] or suffixes[-1:] == [".arrow"]:
        records = _arrow_records(path, "feather")
        line_offset = 1  # row 1 is the first data row
    elif suffixes[-1:] == [".parquet"]:
        records = _arrow_records(path, "parquet")
        line_offset = 1
    elif ".csv" in suffixes:
        records = _csv_records(path)
        line_offset = 2  # line 1 is the header
    else:
        raise DataValidationError(
            f"{path}: unknown file type (expected .csv, .csv.gz, .feather or .parquet)", source=str(path)
        )
    rows = _validate(path, records, tf, line_offset)
    return CandleFile(path=path, rows=rows)


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    raw = gzip.open(path, "rt", newline="") if path.suffix.lower() == ".gz" else open(path, newline="")  # noqa: SIM115
    with raw as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataValidationError(f"{path}: empty file, expected a header line", source=str(path), line=1) from None
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise DataValidationError(f"{path}:1: unreadable: {exc}", source=str(path), line=1) from exc
        columns = _column_map(path, header)
        line = 1
        try:
            for line, fields in enumerate(reader, start=2):  # noqa: B007 - line is reported on errors
                if not fields or all(not f.strip() for f in fields):
                    yield {"__blank__": True}
                    continue
                if len(fields) != len(header):
                    yield {"__error__": f"expected {len(header)} fields, found {len(fields)}"}
                    continue
                yield {name: fields[index] for name, index in columns.items()}
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise DataValidationError(f"{path}:{line + 1}: unreadable: {exc}", source=str(path), line=line + 1) from exc


def _arrow_records(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    import pyarrow.feather as feather
    import pyarrow.parquet as parquet

    try:
        table = feather.read_table(path) if kind == "feather" else parquet.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated classes for a bad file
        raise DataValidationError(f"{path}: not a readable {kind} file: {exc}", source=str(path)) from exc
    columns = _column_map(path, table.column_names)
    data = {name: table.column(index).to_pylist() for name, index in columns.items()}
    for i in range(table.num_rows):
        yield {name: values[i] for name, values in data.items()}


def _column_map(path: Path, header: Sequence[str]) -> dict[str, int]:
    lowered = [h.strip().lower() for h in header]
    columns: dict[str, int] = {}
    time_index = next((lowered.index(c) for c in TIME_COLUMNS if c in lowered), None)
    if time_index is None:
        raise DataValidationError(
            f"{path}: no time column (one of {', '.join(TIME_COLUMNS)}) in header {list(header)}",
            source=str(path),
            line=1,
        )
    columns["ts"] = time_index
    missing = [c for c in PRICE_COLUMNS if c not in lowered]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {', '.join(missing)} in header {list(header)}", source=str(path), line=1
        )
    for c in PRICE_COLUMNS:
        columns[c] = lowered.index(c)
    return columns


def _validate(path: Path, records: Iterable[dict[str, Any]], tf: Timeframe, line_offset: int) -> list[CandleRow]:
    rows: list[CandleRow] = []
    seen: dict[datetime, int] = {}
    for index, record in enumerate(records):
        line = index + line_offset
        if record.get("__blank__"):
            continue
        try:
            if "__error__" in record:
                raise ValueError(record["__error__"])
            ts = parse_time(record["ts"])
            o, h, lo, c, v = (parse_decimal(record[k], k) for k in PRICE_COLUMNS)
            _check_bar(o, h, lo, c, v)
            if tf.floor(ts) != ts:
                raise ValueError(f"time {ts.isoformat()} is not aligned to the {tf} timeframe")
            if ts in seen:
                raise ValueError(f"duplicate time {ts.isoformat()} (first seen on line {seen[ts]})")
        except (ValueError, TypeError, KeyError) as exc:
            raise DataValidationError(
                f"{path}:{line}: malformed row: {exc}", source=str(path), line=line, reason="malformed_row"
            ) from exc
        seen[ts] = line
        rows.append(CandleRow(ts, o, h, lo, c, v, line))
    rows.sort(key=lambda r: r.ts)
    return rows


def _check_bar(o: Decimal, h: Decimal, lo: Decimal, c: Decimal, v: Decimal) -> None:
    if min(o, h, lo, c) <= 0:
        raise ValueError("prices must be positive")
    if not (lo <= o <= h and lo <= c <= h):
        raise ValueError(f"OHLC out of order (open={o} high={h} low={lo} close={c})")
    if v < 0:
        raise ValueError(f"volume must not be negative, got {v}")


def parse_timeframe(text: str) -> Timeframe:
    """Timeframe.parse with the data-error type the CLI reports as bad input."""
    try:
        return Timeframe.parse(text)
    except ValueError as exc:
        raise DataValidationError(str(exc), reason="invalid_timeframe") from None


def parse_decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} is missing")
    try:
        # repr() of a float is its shortest round-trip text, so 0.1 stays 0.1 rather than 0.1000000000000000055…
        result = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{name} is not a number: {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"{name} is not finite: {value!r}")
    return result


def parse_time(value: Any) -> datetime:
    """ISO text (naive = UTC), an aware/naive datetime, or integer epoch milliseconds -> aware UTC."""
    if isinstance(value, datetime):
        moment: datetime = value
        if type(moment) is not datetime:
            moment = datetime.fromisoformat(moment.isoformat())  # pandas.Timestamp from pyarrow -> datetime
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return EPOCH + timedelta(milliseconds=value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return EPOCH + timedelta(milliseconds=int(text))
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"time is not ISO-8601 or epoch milliseconds: {value!r}") from None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise ValueError(f"time has an unsupported type: {value!r}")
