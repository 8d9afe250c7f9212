"""`meltica data` commands: load candle files, show stored candles at any timeframe."""

from __future__ import annotations

import csv
import enum
import sys
from datetime import datetime
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meltica.cli._common import console, database_engine, migration_engine, reports_errors, schema_at_head
from meltica.errors import ConfigurationError, DataValidationError
from meltica.marketdata.candle_files import FORMAT_HELP, parse_time, read_candle_file
from meltica.storage import candles

app = typer.Typer(no_args_is_help=True)


class DataOutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"


@app.command()
@reports_errors
def load(
    file: Path = typer.Argument(..., help=f"Bar file. {FORMAT_HELP}"),
    exchange: str = typer.Option(..., help="Exchange id (ccxt), e.g. binance."),
    symbol: str = typer.Option(..., help="Unified symbol, e.g. BTC/USDT."),
    timeframe: str | None = typer.Option(
        None, help="Timeframe of the bars in the file, e.g. 1m (checked against their spacing; inferred if not given)."
    ),
) -> None:
    """Load a bar file. Reloading the same bars adds nothing; a malformed row loads nothing. Gaps and
    unsorted rows are reported as warnings."""
    engine = database_engine()
    schema_at_head(engine)
    parsed = read_candle_file(file, timeframe)
    timeframe = parsed.timeframe.value
    with Progress(
        TextColumn("[bold]loading {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        task = progress.add_task("load", total=len(parsed.rows), name=file.name)
        result = candles.load_candles(
            engine,
            parsed.rows,
            exchange=exchange,
            symbol=symbol,
            timeframe=timeframe,
            progress=lambda n: progress.advance(task, n),
        )
    console.print(
        f"{file.name}: read {result.read} bars, stored {result.inserted} new, "
        f"{result.already_stored} already stored ({exchange} {symbol} {timeframe}, "
        f"{_fmt(result.start)} → {_fmt(result.end)})"
    )
    if not result.rollup_refreshed:
        _refresh_as_owner(result)


def _refresh_as_owner(result: candles.LoadResult) -> None:
    """TimescaleDB lets only the aggregate's owner refresh it: the load ran as the runtime role, so the
    refresh runs as the owner (the migration role) when this configuration has it, else the policy does it."""

    try:
        owner = migration_engine()
    except ConfigurationError:
        console.print(
            "the 1h roll-up of these bars is refreshed by TimescaleDB's policy within 15 minutes "
            "(no database_migration_url here to refresh it now)"
        )
        return
    try:
        if not candles.refresh(owner, start=result.start, end=result.end):
            console.print("the 1h roll-up of these bars is refreshed by TimescaleDB's policy within 15 minutes")
    finally:
        owner.dispose()


@app.command()
@reports_errors
def show(
    exchange: str = typer.Option(..., help="Exchange id."),
    symbol: str = typer.Option(..., help="Unified symbol."),
    timeframe: str = typer.Option(..., help="Timeframe to show; a multiple of a stored one is rolled up."),
    start: str | None = typer.Option(None, help="First bar time (inclusive), ISO-8601 UTC."),
    end: str | None = typer.Option(None, help="End time (exclusive), ISO-8601 UTC."),
    limit: int | None = typer.Option(None, help="Show only the last N bars."),
    output: DataOutputFormat = typer.Option(DataOutputFormat.table, "--format", help="table or csv."),
) -> None:
    """Print stored candles at TIMEFRAME (1m stored → 5m/1h/1d rolled up by the database)."""
    first, until = _time_option("--start", start), _time_option("--end", end)
    engine = database_engine()
    rows = candles.read_candles(engine, exchange=exchange, symbol=symbol, timeframe=timeframe, start=first, end=until)
    if limit is not None:
        rows = rows[-limit:] if limit > 0 else []
    if output is DataOutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["timestamp", "open", "high", "low", "close", "volume", "bars"])
        for r in rows:
            writer.writerow([r.ts.isoformat(), r.open, r.high, r.low, r.close, r.volume, r.bar_count])
        return
    console.print(candle_table(rows, title=f"{exchange} {symbol} {timeframe} ({len(rows)} bars)"))


@app.command()
@reports_errors
def summary() -> None:
    """What is stored: bars per exchange, symbol and timeframe."""
    engine = database_engine()
    console.print(summary_table(candles.candle_summary(engine)))


def candle_table(rows: list[candles.StoredCandle], title: str) -> Table:
    table = Table(title=title)
    for name in ("time (UTC)", "open", "high", "low", "close", "volume", "bars"):
        table.add_column(name, justify="left" if name.startswith("time") else "right")
    for r in rows:
        table.add_row(_fmt(r.ts), str(r.open), str(r.high), str(r.low), str(r.close), str(r.volume), str(r.bar_count))
    return table


def summary_table(stats: list[dict[str, object]]) -> Table:
    table = Table(title="Stored candles")
    for name in ("exchange", "symbol", "timeframe", "bars", "first (UTC)", "last (UTC)"):
        table.add_column(name)
    for s in stats:
        first, last = s["first"], s["last"]
        table.add_row(
            str(s["exchange"]),
            str(s["symbol"]),
            str(s["timeframe"]),
            str(s["bars"]),
            _fmt(first if isinstance(first, datetime) else None),
            _fmt(last if isinstance(last, datetime) else None),
        )
    return table


def _time_option(option: str, value: str | None) -> datetime | None:
    """A time option as aware UTC; a bad one is bad input (one line, exit 2), not a traceback."""
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise DataValidationError(f"{option}: {exc}", reason="invalid_time") from None


def _fmt(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M") if ts else "-"
