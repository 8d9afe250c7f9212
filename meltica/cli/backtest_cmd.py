"""`meltica backtest`: run one strategy over recorded bars, print the summary, write the results."""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meltica.cli._common import console, database_engine, reports_errors, schema_at_head
from meltica.errors import ConfigurationError
from meltica.marketdata.candle_files import FORMAT_HELP, parse_time

BACKTEST_EPILOG = (
    "The summary, metrics.json and report.html show rejected orders by reason, the effective parameters "
    "(defaults included), the data's fingerprint (bars, first/last time, file SHA-256), the fill model and the "
    "code version. An order the strategy asks for that cannot exist (e.g. a stop at or below zero) is rejected "
    "as INVALID_INTENT with its time, field and value, and the run goes on. A WARNING line (also in "
    "metrics.json 'warnings' and the report) says when nothing traded, most orders were rejected or impossible "
    "orders were asked for; the exit code stays 0. Parameters that can only produce invalid orders are refused "
    "up front (exit 2, naming the parameter). Orders still working when the data ends are 'open_at_end'."
)


def parse_param(item: str) -> tuple[str, Any]:
    """``key=value``; the value as JSON when it parses (numbers, true/false, lists), else the string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigurationError(f"--param {item!r}: expected key=value", field="param")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, float):
        value = raw  # keep decimals exact: pydantic parses the string into the field's type
    return key.strip(), value


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None

    try:
        return parse_time(value)
    except Exception:
        raise ConfigurationError(f"--{name} {value!r} is not an ISO-8601 time", field=name) from None


def _decimal(value: str | None, name: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        raise ConfigurationError(f"--{name} {value!r} is not a number", field=name) from None


@reports_errors
def backtest(
    strategy: str = typer.Option(
        ..., "--strategy", help="A registered name (e.g. momentum), path/to/file.py:Class or module:Class."
    ),
    param: list[str] = typer.Option([], "--param", help="Strategy parameter key=value (repeatable)."),
    data: Path | None = typer.Option(None, "--data", help=f"Bar file. {FORMAT_HELP}"),
    trades: Path | None = typer.Option(
        None, "--trades", help="Recorded trades to replay (.parquet, .csv[.gz], .json[.gz]); with or instead of --data."
    ),
    book_snapshot: Path | None = typer.Option(
        None, "--book-snapshot", help="Binance-style L2 snapshot CSV to replay (market orders walk the book)."
    ),
    book_updates: Path | None = typer.Option(
        None, "--book-updates", help="Binance-style diff-depth CSV applied after --book-snapshot."
    ),
    book_gaps: str = typer.Option(
        "drop", "--book-gaps", help="A diff that breaks the update-id sequence: drop (until a snapshot), apply, raise."
    ),
    exchange: str = typer.Option("binance", help="Exchange id (and of the stored candles)."),
    symbol: str = typer.Option("BTC/USDT", help="Unified symbol traded."),
    timeframe: str | None = typer.Option(
        None,
        help="Bar timeframe: of --data (must match the bars' spacing; inferred from it when not given), "
        "or rolled up from the database (default 1m).",
    ),
    start: str | None = typer.Option(None, help="First bar (inclusive, ISO-8601 UTC) from the database."),
    end: str | None = typer.Option(None, help="End (exclusive, ISO-8601 UTC) from the database."),
    fees_bps: str = typer.Option("10", "--fees-bps", help="Taker (and default maker) fee in bps."),
    maker_fees_bps: str | None = typer.Option(None, "--maker-fees-bps", help="Maker fee in bps (default: --fees-bps)."),
    slippage_bps: str = typer.Option("0", "--slippage-bps", help="Taker slippage in bps."),
    latency_ms: int = typer.Option(
        0, "--latency-ms", help="Decision to venue arrival, in ms (up to one bar: every fill a whole bar later)."
    ),
    volume_share: str | None = typer.Option(None, "--volume-share", help="Partial-fill cap: share of a bar's volume."),
    balance: list[str] = typer.Option([], "--balance", help="Initial balance ASSET=AMOUNT (repeatable)."),
    output: Path = typer.Option(..., "--output", help="Directory for metrics.json, CSVs, report.html, PNGs."),
    store: bool = typer.Option(True, "--store/--no-store", help="Store the run in the database under its run id."),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Backtest STRATEGY on a candle file (--data) or stored candles, and/or replayed recorded trades
    (--trades) and L2 book (--book-snapshot [--book-updates]); write results into --output
    (``BACKTEST_EPILOG`` says what they show)."""
    from meltica.backtest import BacktestConfig, BarSeries, run_backtest, write_report
    from meltica.backtest.provenance import file_sha256, series_sha256
    from meltica.marketdata.series import BookSeries, TradeSeries

    if book_updates is not None and book_snapshot is None:
        raise ConfigurationError("--book-updates needs --book-snapshot", field="book-snapshot")
    if book_gaps not in ("drop", "apply", "raise"):
        raise ConfigurationError(f"--book-gaps {book_gaps!r}: expected drop, apply or raise", field="book-gaps")

    file_bars: BarSeries | None = None
    if data is not None:  # first: a file's timeframe is checked against (or inferred from) its bars
        file_bars = BarSeries.from_file(data, exchange=exchange, symbol=symbol, timeframe=timeframe)
        timeframe = file_bars.timeframe
    timeframe = timeframe or "1m"
    balances: dict[str, str] = {}
    for item in balance:
        asset, sep, amount = item.partition("=")
        if not sep:
            raise ConfigurationError(f"--balance {item!r}: expected ASSET=AMOUNT", field="balance")
        balances[asset.strip()] = amount.strip()
    config = BacktestConfig.create(
        strategy=strategy,
        params=dict(parse_param(p) for p in param),
        exchange=exchange,
        symbol=symbol,
        timeframe=timeframe,
        start=_parse_time(start, "start"),
        end=_parse_time(end, "end"),
        taker_fee_bps=_decimal(fees_bps, "fees-bps"),
        maker_fee_bps=_decimal(maker_fees_bps or fees_bps, "maker-fees-bps"),
        slippage_bps=_decimal(slippage_bps, "slippage-bps"),
        latency_ms=latency_ms,
        bar_volume_share=_decimal(volume_share, "volume-share"),
        initial_balances=balances,
    )
    database = None
    replay = trades is not None or book_snapshot is not None
    trade_series = (
        None
        if trades is None
        else _trades_in_range(TradeSeries.from_file(trades, exchange=exchange, symbol=symbol), config.start, config.end)
    )
    book_series = (
        None
        if book_snapshot is None
        else BookSeries.from_binance_csv(
            book_snapshot, book_updates, exchange=exchange, symbol=symbol, on_gap=book_gaps
        )
    )
    bars: BarSeries | None
    if replay and data is None:
        bars = None
    elif file_bars is not None:
        bars = file_bars
        if config.start is not None or config.end is not None:
            keep = [
                i
                for i, t in enumerate(bars.ts)
                if (config.start is None or t >= config.start) and (config.end is None or t < config.end)
            ]
            bars = BarSeries(
                bars.exchange,
                bars.symbol,
                bars.timeframe,
                [bars.ts[i] for i in keep],
                [bars.open[i] for i in keep],
                [bars.high[i] for i in keep],
                [bars.low[i] for i in keep],
                [bars.close[i] for i in keep],
                [bars.volume[i] for i in keep],
            )
    else:
        database = database_engine()
        bars = BarSeries.from_database(
            database, exchange=exchange, symbol=symbol, timeframe=timeframe, start=config.start, end=config.end
        )
    with Progress(
        TextColumn("[bold]backtest {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
        disable=not progress_bar,
    ) as progress:
        task = progress.add_task("run", total=len(bars) if bars is not None else None, name=strategy)
        result = run_backtest(
            config,
            bars,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            trades=trade_series,
            book=book_series,
        )
    fingerprint: dict[str, Any] = dict(result.data_fingerprint)
    for role, path in (
        ("data", data),
        ("trades", trades),
        ("book_snapshot", book_snapshot),
        ("book_updates", book_updates),
    ):
        if path is not None:
            fingerprint[f"{role}_file"] = str(path)
            fingerprint[f"{role}_sha256"] = file_sha256(path)
    if data is None and bars is not None:
        fingerprint["source"] = "database"
        fingerprint["sha256"] = series_sha256((bars.ts, bars.open, bars.high, bars.low, bars.close, bars.volume))
    result = dataclasses.replace(result, data_fingerprint=fingerprint)
    result.write_files(output)
    prices: list[tuple[datetime, Decimal]] = []
    if bars is not None:
        prices = bars.closes()
    elif trade_series is not None:
        prices = list(zip(trade_series.ts, trade_series.price, strict=True))
    write_report(result, output, prices={symbol: prices} if prices else None)
    if book_series is not None and book_series.gaps:
        console.print(f"order book: {book_series.gaps} sequence gap(s), {book_series.dropped} diff(s) dropped")
    console.print(summary_table(result))
    console.print(f"fill model: {result.fill_model.get('description', '—')}")
    print_warnings(result.warnings)
    if store:
        database = database or database_engine()
        schema_at_head(database)
        result.save(database)
        console.print(f"stored as run {result.run_id}")
    console.print(f"results in {output}/ (metrics.json, orders.csv, fills.csv, equity.csv, trades.csv, report.html)")


def _trades_in_range(series: Any, start: datetime | None, end: datetime | None) -> Any:
    if start is None and end is None:
        return series
    from meltica.marketdata.series import TradeSeries

    keep = [i for i, t in enumerate(series.ts) if (start is None or t >= start) and (end is None or t < end)]
    return TradeSeries(
        series.exchange,
        series.symbol,
        [series.ts[i] for i in keep],
        [series.price[i] for i in keep],
        [series.quantity[i] for i in keep],
        [series.side[i] for i in keep],
        [series.trade_id[i] for i in keep] if series.trade_id else (),
    )


def summary_table(result: Any) -> Table:
    from meltica.backtest.report import format_metric

    m = result.metrics
    title = f"{result.strategy} {', '.join(result.symbols)} {result.timeframe} — run {result.run_id}"
    table = Table(title=title, min_width=len(title))  # as wide as its title: a run id never wraps
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in (
        "initial_equity",
        "final_equity",
        "total_return",
        "cagr",
        "sharpe",
        "sortino",
        "max_drawdown",
        "trades",
        "win_rate",
        "profit_factor",
        "fees",
        "exposure",
    ):
        table.add_row(name, format_metric(name, getattr(m, name)))
    table.add_row("fills", str(len(result.fills)))
    table.add_row("orders", str(len(result.orders)))
    rejections = result.rejections
    table.add_row("rejected", str(sum(rejections.values())))
    for code, count in rejections.items():
        table.add_row(f"  {code}", str(count))
    open_at_end = sum(1 for o in result.orders if o.status == "open_at_end")
    if open_at_end:
        table.add_row("open at end", str(open_at_end))
    return table


def print_warnings(warnings: list[str]) -> None:
    """Each warning on its own loud line (they are also in metrics.json and the report)."""
    for warning in warnings:
        console.print(f"[bold red]WARNING[/] {escape(warning)}")
