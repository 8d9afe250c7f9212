"""Load a recorded candle file into the database as a Prefect flow run (the file import flow).

A thin shell: reading, validating and the idempotent COPY load are `meltica.marketdata` and
`meltica.storage`; this module only gives them a flow run, the flows' one retry rule (``flows._retry``), and a
markdown artifact of what was stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows import scrub_secrets_in_logs
from flows._retry import meltica_task
from meltica.infra.postgres import database_url, ensure_schema_at_head
from meltica.marketdata.candle_files import read_candle_file
from meltica.storage import candles
from meltica.storage.engine import make_engine


@meltica_task("candle file import", task_run_name="load {path}")
def load_file(
    path: str, exchange: str, symbol: str, timeframe: str, db_url: str, *, given: bool = True
) -> dict[str, Any]:
    engine = make_engine(db_url)
    try:
        # staging/prod: refused unless at head; dev: migrated as the owner (or through a URL handed in)
        ensure_schema_at_head(engine, migrate_through_engine=given)
        parsed = read_candle_file(Path(path), timeframe)
        result = candles.load_candles(engine, parsed.rows, exchange=exchange, symbol=symbol, timeframe=timeframe)
    finally:
        engine.dispose()
    return {
        "read": result.read,
        "inserted": result.inserted,
        "already_stored": result.already_stored,
        "start": result.start.isoformat() if result.start else None,
        "end": result.end.isoformat() if result.end else None,
    }


@flow(name="import-candle-file", flow_run_name="import {exchange} {symbol} {timeframe} from {path}")
def import_candle_file(
    path: str, exchange: str, symbol: str, timeframe: str, database: str | None = None
) -> dict[str, Any]:
    """Load one candle file (CSV, Feather, Parquet); reloading adds nothing.

    Args:
        path: The file on the worker (CSV, Feather or Parquet).
        exchange: Exchange the bars are stored under, e.g. binance.
        symbol: Market symbol the bars are stored under, e.g. BTC/USDT.
        timeframe: Timeframe of the file's bars, e.g. 1m.
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
    """
    scrub_secrets_in_logs()
    summary: dict[str, Any] = load_file(
        path, exchange, symbol, timeframe, database or database_url(), given=database is not None
    )
    create_markdown_artifact(
        key="candle-import",
        markdown=(
            f"### Candle import: {exchange} {symbol} {timeframe}\n\n"
            f"| file | read | new | already stored | first | last |\n|---|---|---|---|---|---|\n"
            f"| `{Path(path).name}` | {summary['read']} | {summary['inserted']} | {summary['already_stored']} "
            f"| {summary['start']} | {summary['end']} |\n"
        ),
        description="Bars read from the file and stored in the database",
    )
    return summary
