"""Historical ingestion as a Prefect flow: OHLCV (and optionally trades) for an exchange's symbols and
timeframes, one task run per series.

A thin shell: paging, resuming, the idempotent COPY loads and gap repair are
``meltica.marketdata.ingest``; this module builds the adapter and the engine, gives every series a task
run (retried only for the retryable error family), and writes a markdown artifact of what was stored.
A series that fails still lets the others run; the flow then fails with that series' error
(``ExchangeUnavailableError``, ``InfrastructureUnavailableError`` …), not a library traceback.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import scrub_secrets_in_logs
from flows._retry import RETRIES, RETRY_DELAY_SECONDS, meltica_task
from meltica.adapters.base import ExchangeAdapter
from meltica.errors import ConfigurationError
from meltica.infra.postgres import database_url, ensure_schema_at_head
from meltica.marketdata import ingest as core
from meltica.storage.engine import make_engine


def _run_name() -> str:
    p = flow_run.parameters
    name = f"ingest {p['exchange']} {','.join(p['symbols'])} {','.join(p['timeframes'])}"
    if p.get("trades"):
        name += " +trades"
    return name + (f" from {p['start']}" if p.get("start") else " (resume)")


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(f"{name} {value!r} is not an ISO date/time", field=name) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _adapter(exchange: str, account: str | None, emulator_url: str | None) -> ExchangeAdapter:
    from meltica.adapters.registry import create_adapter

    if emulator_url is not None:
        from meltica.emulator import CCXT_OPTIONS, ccxt_urls_for

        return create_adapter(
            exchange, account=account or "ingest", urls={"api": ccxt_urls_for(emulator_url)}, options=dict(CCXT_OPTIONS)
        )
    if account is not None:
        from meltica.adapters.factory import adapter_for_account
        from meltica.config import load_settings

        adapter = adapter_for_account(load_settings(), account)
        if adapter.exchange_id != exchange:
            raise ConfigurationError(
                f"account {account!r} trades on {adapter.exchange_id}, not {exchange}", field="account"
            )
        return adapter
    return create_adapter(exchange, account="ingest")  # public market data needs no credentials


async def _ingest(
    kind: str,
    exchange: str,
    symbol: str,
    timeframe: str | None,
    start: datetime | None,
    end: datetime | None,
    account: str | None,
    emulator_url: str | None,
    db_url: str,
    page_limit: int,
    given: bool,
) -> core.IngestReport:
    engine = make_engine(db_url)
    adapter = _adapter(exchange, account, emulator_url)
    try:
        with core.database_errors(engine):
            # staging/prod: refused unless at head; dev: migrated as the owner (or through a URL handed in)
            ensure_schema_at_head(engine, migrate_through_engine=given)
        instruments = await adapter.load_instruments()
        if symbol not in instruments:
            raise ConfigurationError(f"{exchange} has no symbol {symbol!r}", field="symbols")
        if kind == "trades":
            return await core.ingest_trades(adapter, engine, symbol, start=start, end=end, page_limit=page_limit)
        assert timeframe is not None
        return await core.ingest_ohlcv(adapter, engine, symbol, timeframe, start=start, end=end, page_limit=page_limit)
    finally:
        await adapter.close()
        engine.dispose()


@meltica_task("ingestion", task_run_name="{kind} {exchange} {symbol} {timeframe}")
def ingest_series(
    kind: str,
    exchange: str,
    symbol: str,
    timeframe: str | None,
    start: str | None,
    end: str | None,
    account: str | None,
    emulator_url: str | None,
    db_url: str,
    page_limit: int,
    given: bool = True,
) -> dict[str, Any]:
    report = asyncio.run(
        _ingest(
            kind,
            exchange,
            symbol,
            timeframe,
            _parse_time(start, "start"),
            _parse_time(end, "end"),
            account,
            emulator_url,
            db_url,
            page_limit,
            given,
        )
    )
    return {
        "kind": kind,
        "symbol": symbol,
        "timeframe": timeframe,
        "fetched": report.fetched,
        "inserted": report.inserted,
        "pages": report.pages,
        "first": report.first.isoformat() if report.first else None,
        "last": report.last.isoformat() if report.last else None,
        "gaps": [str(g) for g in report.gaps],
        "refetched": report.refetched,
        "unfilled": [str(g) for g in report.unfilled],
    }


def _markdown(exchange: str, rows: list[dict[str, Any]], failures: list[tuple[str, str]]) -> str:
    lines = [
        f"### Ingestion: {exchange}\n",
        "| series | fetched | new | pages | first | last | gaps found | refetched | still missing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        series = f"{r['symbol']} {r['timeframe'] or 'trades'}"
        unfilled = "<br>".join(r["unfilled"]) or "none"
        lines.append(
            f"| {series} | {r['fetched']} | {r['inserted']} | {r['pages']} | {r['first']} | {r['last']} "
            f"| {len(r['gaps'])} | {r['refetched']} | {unfilled} |"
        )
    for series, error in failures:
        lines.append(f"| {series} | failed: {error} | | | | | | | |")
    return "\n".join(lines) + "\n"


@flow(name="ingest", flow_run_name=_run_name)
def ingest(
    exchange: str,
    symbols: list[str],
    timeframes: list[str],
    start: str | None = None,
    account: str | None = None,
    emulator_url: str | None = None,
    end: str | None = None,
    trades: bool = False,
    database: str | None = None,
    page_limit: int = 1000,
    retries: int = RETRIES,
    retry_delay_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """Ingest OHLCV bars (and with ``trades`` public trades) of ``symbols`` × ``timeframes`` from
    ``start`` (ISO; None resumes after the stored data, or starts at the venue's first bar).

    Args:
        exchange: Exchange to fetch from, e.g. binance.
        symbols: Market symbols, e.g. ["BTC/USDT", "ETH/USDT"].
        timeframes: Bar timeframes, e.g. ["1m", "1h"].
        start: First bar (ISO date/time, UTC); empty: resume after the stored bars.
        account: Configured account whose keys are used; empty: public market data.
        emulator_url: Fetch from the local exchange emulator at this URL instead.
        end: End of the range (ISO date/time, UTC, exclusive); empty: up to now.
        trades: Also ingest public trades.
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
        page_limit: Bars or trades per request.
        retries: Retries of a series after an outage (never after a terminal error).
        retry_delay_seconds: Seconds between those retries; empty: the flows' rule (1, 5, then 15 s).
    """
    scrub_secrets_in_logs()
    db_url = database or database_url()
    delays = RETRY_DELAY_SECONDS if retry_delay_seconds is None else retry_delay_seconds
    series_task = ingest_series.with_options(retries=retries, retry_delay_seconds=delays)
    jobs: list[tuple[str, str, str | None]] = [("ohlcv", s, tf) for s in symbols for tf in timeframes]
    if trades:
        jobs += [("trades", s, None) for s in symbols]
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    failed_states: list[Any] = []
    for kind, symbol, timeframe in jobs:
        state = series_task(
            kind,
            exchange,
            symbol,
            timeframe,
            start,
            end,
            account,
            emulator_url,
            db_url,
            page_limit,
            database is not None,
            return_state=True,
        )
        if state.is_completed():
            rows.append(state.result())
        else:
            failed_states.append(state)
            failures.append((f"{symbol} {timeframe or 'trades'}", state.message or state.name or "failed"))
    create_markdown_artifact(
        key="ingest",
        markdown=_markdown(exchange, rows, failures),
        description="Per series: rows fetched, new rows stored, gaps found and refetched",
    )
    for state in failed_states:
        state.result()  # raises the series' own (taxonomy) error: the flow fails with it
    return rows
