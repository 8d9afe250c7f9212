"""Reading bar (candle) files into validated rows: the one loader behind ``meltica backtest --data``,
``meltica optimize --data`` (and its walk-forward), ``meltica data load``, paper replays and the flows.

The whole file is read and checked before anything is stored, so a malformed row is reported with its
line number and nothing of the file is half-loaded.

Accepted files (``FORMAT_HELP`` is the user-facing summary):

* ``.csv`` / ``.csv.gz`` with a header line (UTF-8, a byte-order mark is fine);
* ``.feather`` / ``.arrow`` and ``.parquet`` (freqtrade's ``.feather`` candles included);
* ``.json`` / ``.json.gz``: freqtrade's ``[[ms, open, high, low, close, volume], ...]``, or a pandas
  ``DataFrame.to_json`` in orient ``split``, ``records``, ``columns``, ``index``, ``values`` or ``table``
  (the time is a column or the frame's index).

Columns (case-insensitive): a time column named ``timestamp``, ``date``, ``time``, ``ts``, ``open_time``
or ``datetime``, and ``open``, ``high``, ``low``, ``close``, ``volume``; other columns are ignored.
A time is ISO-8601 (without an offset = UTC) or a number of seconds, milliseconds, microseconds or
nanoseconds since the epoch, told apart by magnitude (below 1e11 seconds, below 1e14 milliseconds,
below 1e17 microseconds, else nanoseconds), so epoch times before 1973-03-03 must be written as ISO.
CSV and JSON prices are parsed from their text straight to ``Decimal`` (exact); Feather/Parquet floats
are converted through their shortest round-trip representation.

Bar spacing: the most common distance between consecutive bars must be the timeframe (5-minute bars
read as ``1m`` are refused, naming the timeframe they have); without a timeframe it is inferred from
that spacing. Rows out of time order are sorted and missing bars (gaps) are left missing; both are
reported as warnings with their counts (``CandleFile.warnings``, also logged), never silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from meltica.domain.market_data import CandleRow
from meltica.domain.timeframe import Timeframe, parse_timeframe
from meltica.errors import DataValidationError

TIME_COLUMNS = ("timestamp", "date", "time", "ts", "open_time", "datetime")
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FORMAT_HELP = (
    "Accepted: .csv or .csv.gz with a header line (UTF-8, a BOM is fine), .feather, .parquet, "
    ".json or .json.gz (freqtrade candles: rows of ms, open, high, low, close, volume; or pandas to_json "
    "in orient split, records, columns, index, values or table). "
    "Columns: a time column (timestamp, date, time, ts, open_time or datetime: the bar's open time) and "
    "open, high, low, close, volume. Times: ISO-8601 (no offset = UTC) or epoch seconds, ms, µs or ns, "
    "told apart by magnitude. The bars' spacing must match the timeframe (inferred from it when not "
    "given); rows out of order and gaps are reported as warnings."
)
"""What ``--help`` says about the accepted bar files."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandleFile:
    """The rows of one bar file in time order. ``unsorted``: rows whose time was before the previous row's
    (sorted here); ``gaps``/``missing_bars``: holes in the series and the bars they lack (not filled);
    ``warnings``: those facts in words, for the user."""

    path: Path
    rows: list[CandleRow]
    timeframe: Timeframe
    unsorted: int = 0
    gaps: int = 0
    missing_bars: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def start(self) -> datetime | None:
        return self.rows[0].ts if self.rows else None

    @property
    def end(self) -> datetime | None:
        return self.rows[-1].ts if self.rows else None


def read_candle_file(path: Path | str, timeframe: Timeframe | str | None = None) -> CandleFile:
    """Read, parse and validate every row of ``path``; raise on the first malformed one, or when the bars'
    spacing is not ``timeframe`` (inferred from the spacing when ``None``)."""
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
    elif ".json" in suffixes:
        records = _json_records(path)
        line_offset = 1
    else:
        raise DataValidationError(
            f"{path}: unknown file type (expected .csv, .csv.gz, .feather, .parquet or .json)", source=str(path)
        )
    rows, unsorted = _validate(path, records, tf, line_offset)
    return _checked_spacing(path, rows, tf, unsorted)


def duration_text(delta: timedelta) -> str:
    """A duration as a timeframe-like text (``5m``, ``1h``, ``90s``)."""
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{delta.total_seconds():g}s"


def _checked_spacing(path: Path, rows: list[CandleRow], tf: Timeframe | None, unsorted: int) -> CandleFile:
    """The file's timeframe checked (or inferred) against the bars' most common spacing; gaps counted."""
    warnings: list[str] = []
    if unsorted:
        warnings.append(f"{path.name}: {unsorted} row(s) out of time order; the bars were sorted by time")
    if len(rows) < 2:
        if tf is None:
            raise DataValidationError(
                f"{path}: cannot infer the timeframe from {len(rows)} bar(s); give the timeframe",
                source=str(path),
                reason="invalid_timeframe",
            )
        return CandleFile(path, rows, tf, unsorted, warnings=tuple(warnings))
    spacing = Counter(b.ts - a.ts for a, b in itertools.pairwise(rows))
    step, count = spacing.most_common(1)[0]
    if tf is None:
        try:
            tf = Timeframe.parse(duration_text(step))
        except ValueError:
            raise DataValidationError(
                f"{path}: the bars are {step.total_seconds():g} s apart, not a timeframe", source=str(path)
            ) from None
        if any(tf.floor(r.ts) != r.ts for r in rows):
            raise DataValidationError(
                f"{path}: the bars are {tf} apart but not aligned to {tf} boundaries; give the timeframe",
                source=str(path),
                reason="invalid_timeframe",
            )
    elif step != tf.delta:
        share = f"{count} of {len(rows) - 1} intervals"
        raise DataValidationError(
            f"{path}: the bars are {duration_text(step)} apart ({share}) but the timeframe is {tf}: "
            f"give --timeframe {duration_text(step)} (or leave it out to infer it)",
            source=str(path),
            reason="timeframe_mismatch",
        )
    gaps = missing = 0
    longest: tuple[timedelta, datetime] | None = None
    for a, b in itertools.pairwise(rows):
        delta = b.ts - a.ts
        if delta > tf.delta:
            gaps += 1
            missing += delta // tf.delta - 1
            if longest is None or delta > longest[0]:
                longest = (delta, a.ts)
    if gaps and longest is not None:
        warnings.append(
            f"{path.name}: {gaps} gap(s) in the {tf} bars, {missing} bar(s) missing (not filled in); "
            f"the longest: {duration_text(longest[0] - tf.delta)} after {longest[1].isoformat()}"
        )
    for text in warnings:
        log.warning(text)
    return CandleFile(path, rows, tf, unsorted, gaps, missing, tuple(warnings))


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is dropped instead of becoming part of the first name.
    gz = path.suffix.lower() == ".gz"
    raw = (
        gzip.open(path, "rt", newline="", encoding="utf-8-sig")  # noqa: SIM115
        if gz
        else open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115
    )
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
    # lazy: pyarrow only for Feather/Parquet files
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


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a freqtrade or pandas ``to_json`` candle file as ``{"ts", "open", ...}`` records."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
        data = json.loads(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig").read(), parse_float=Decimal)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise DataValidationError(f"{path}: not a readable JSON file: {exc}", source=str(path)) from exc
    rows: list[Any]
    index: list[Any] | None = None
    columns: list[str] | None = None
    if isinstance(data, list):  # freqtrade / orient="values", or orient="records"
        rows = data
        if rows and isinstance(rows[0], list):
            columns = ["ts", *PRICE_COLUMNS]
    elif isinstance(data, Mapping) and "data" in data and ("columns" in data or "schema" in data):
        if "columns" in data:  # orient="split"
            columns = [str(c) for c in data["columns"]]
            rows = list(data["data"])
            index = list(data["index"]) if "index" in data else None
        else:  # orient="table": records, the index a field
            rows = list(data["data"])
    elif isinstance(data, Mapping) and data:
        first = next(iter(data.values()))
        if not isinstance(first, Mapping):
            raise DataValidationError(f"{path}: unrecognised JSON candle layout", source=str(path))
        lowered = {str(k).strip().lower() for k in data}
        if {"open", "close"} <= lowered:  # orient="columns": {column: {index: value}}
            keys = list(first)
            index = keys
            rows = [{str(col): values.get(k) for col, values in data.items()} for k in keys]
        else:  # orient="index": {index: {column: value}}
            index = list(data)
            rows = list(data.values())
    else:
        raise DataValidationError(f"{path}: no candles in the JSON file", source=str(path))
    if not rows:
        return
    if columns is not None:
        header = columns if index is None else ["index", *columns]
        mapping = _column_map(path, header, extra_time=("index",))
        for i, row in enumerate(rows):
            values = list(row) if index is None else [index[i], *row]
            if len(values) < len(header):
                yield {"__error__": f"expected {len(header)} values, found {len(values)}"}
                continue
            yield {name: values[pos] for name, pos in mapping.items()}
        return
    names: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            yield {"__error__": f"expected an object, found {row!r}"}
            continue
        header = [str(k) for k in row]
        if index is not None:
            header = ["index", *header]
        if header != names:
            names = header
            mapping = _column_map(path, header, extra_time=("index",))
        values = list(row.values()) if index is None else [index[i], *row.values()]
        yield {name: values[pos] for name, pos in mapping.items()}


def _column_map(path: Path, header: Sequence[str], extra_time: Sequence[str] = ()) -> dict[str, int]:
    lowered = [h.strip().lower() for h in header]
    columns: dict[str, int] = {}
    time_index = next((lowered.index(c) for c in (*TIME_COLUMNS, *extra_time) if c in lowered), None)
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


def _validate(
    path: Path, records: Iterable[dict[str, Any]], tf: Timeframe | None, line_offset: int
) -> tuple[list[CandleRow], int]:
    """The rows in time order and how many were out of order in the file."""
    rows: list[CandleRow] = []
    seen: dict[datetime, int] = {}
    unsorted = 0
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
            if tf is not None and tf.floor(ts) != ts:
                raise ValueError(f"time {ts.isoformat()} is not aligned to the {tf} timeframe")
            if ts in seen:
                raise ValueError(f"duplicate time {ts.isoformat()} (first seen on line {seen[ts]})")
        except (ValueError, TypeError, KeyError) as exc:
            raise DataValidationError(
                f"{path}:{line}: malformed row: {exc}", source=str(path), line=line, reason="malformed_row"
            ) from exc
        seen[ts] = line
        if rows and ts < rows[-1].ts:
            unsorted += 1
        rows.append(CandleRow(ts, o, h, lo, c, v, line))
    if unsorted:
        rows.sort(key=lambda r: r.ts)
    return rows, unsorted


def _check_bar(o: Decimal, h: Decimal, lo: Decimal, c: Decimal, v: Decimal) -> None:
    if min(o, h, lo, c) <= 0:
        raise ValueError("prices must be positive")
    if not (lo <= o <= h and lo <= c <= h):
        raise ValueError(f"OHLC out of order (open={o} high={h} low={lo} close={c})")
    if v < 0:
        raise ValueError(f"volume must not be negative, got {v}")


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


def epoch_time(number: int | Decimal) -> datetime:
    """Epoch seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude) -> aware UTC."""
    magnitude = -number if number < 0 else number
    if magnitude < 10**11:
        scale = 1_000_000  # seconds: up to the year 5138
    elif magnitude < 10**14:
        scale = 1000  # milliseconds
    elif magnitude < 10**17:
        scale = 1  # microseconds
    else:
        return EPOCH + timedelta(microseconds=int(number) // 1000)  # nanoseconds
    return EPOCH + timedelta(microseconds=int(number * scale))


def parse_time(value: Any) -> datetime:
    """ISO text (naive = UTC), an aware/naive datetime, or an epoch number (``epoch_time``) -> aware UTC."""
    if isinstance(value, datetime):
        moment: datetime = value
        if type(moment) is not datetime:
            moment = datetime.fromisoformat(moment.isoformat())  # pandas.Timestamp from pyarrow -> datetime
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if isinstance(value, bool):
        raise ValueError(f"time has an unsupported type: {value!r}")
    if isinstance(value, int | Decimal | float):
        number = value if isinstance(value, int) else Decimal(repr(value) if isinstance(value, float) else value)
        if isinstance(number, Decimal) and not number.is_finite():
            raise ValueError(f"time is not finite: {value!r}")
        return epoch_time(number)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed_number: Decimal | None = Decimal(text)
        except InvalidOperation:
            parsed_number = None
        if parsed_number is not None and parsed_number.is_finite():
            whole = parsed_number == parsed_number.to_integral_value()
            return epoch_time(int(parsed_number) if whole else parsed_number)
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"time is not ISO-8601 or an epoch number: {value!r}") from None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise ValueError(f"time has an unsupported type: {value!r}")
