"""Candles in the database: bulk COPY loads (idempotent) and reads at any multiple of the stored timeframe."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, text

from meltica.domain.market_data import CandleRow
from meltica.domain.timeframe import Timeframe, parse_timeframe
from meltica.errors import DataValidationError
from meltica.storage import timeseries
from meltica.storage.errors import storage_errors

COPY_CHUNK = 5_000

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class LoadResult:
    read: int
    inserted: int
    start: datetime | None
    end: datetime | None
    # False when the roll-up needed a refresh this role may not run (TimescaleDB, not the aggregate's owner)
    rollup_refreshed: bool = True

    @property
    def already_stored(self) -> int:
        return self.read - self.inserted


@dataclass(frozen=True)
class StoredCandle:
    exchange: str
    symbol: str
    timeframe: str
    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    bar_count: int


def load_candles(
    engine: Engine,
    rows: Sequence[CandleRow],
    *,
    exchange: str,
    symbol: str,
    timeframe: str,
    progress: ProgressCallback | None = None,
    refresh_rollups: bool = True,
) -> LoadResult:
    """Store ``rows`` with COPY in one transaction; rows already stored (same natural key) are skipped.

    COPY goes into a temporary staging table first because COPY itself cannot skip conflicts;
    ``INSERT … ON CONFLICT DO NOTHING`` from the stage makes a reload add nothing.
    """
    parse_timeframe(timeframe)  # validates
    if not exchange or not symbol:
        raise DataValidationError("exchange and symbol are required to load candles")
    with storage_errors(engine, f"storing {exchange} {symbol} {timeframe} candles"), engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE candles_stage (LIKE candles INCLUDING DEFAULTS) ON COMMIT DROP")
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            with cur.copy(
                "COPY candles_stage (exchange, symbol, timeframe, ts, open, high, low, close, volume) FROM STDIN"
            ) as copy:
                for i, r in enumerate(rows, start=1):
                    copy.write_row((exchange, symbol, timeframe, r.ts, r.open, r.high, r.low, r.close, r.volume))
                    if progress is not None and i % COPY_CHUNK == 0:
                        progress(COPY_CHUNK)
            if progress is not None and len(rows) % COPY_CHUNK:
                progress(len(rows) % COPY_CHUNK)
        inserted = conn.exec_driver_sql(
            "INSERT INTO candles SELECT * FROM candles_stage ORDER BY ts ON CONFLICT DO NOTHING"
        ).rowcount
    result = LoadResult(
        read=len(rows),
        inserted=inserted,
        start=min((r.ts for r in rows), default=None),
        end=max((r.ts for r in rows), default=None),
    )
    behind = refresh_rollups and not inserted and timeframe == "1m" and bool(rows)
    needs_refresh = refresh_rollups and (inserted or (behind and _rollup_behind(engine, exchange, symbol, result)))
    if needs_refresh and not refresh(engine, start=result.start, end=result.end):
        result = replace(result, rollup_refreshed=False)
    return result


def _rollup_behind(engine: Engine, exchange: str, symbol: str, loaded: LoadResult) -> bool:
    """True when ``candles_1h`` does not account for every stored 1m bar of the hours a load touched — a
    refresh that failed after an earlier load committed its rows (a reload then stores nothing new)."""
    start, end = timeseries.hour_window(loaded.start, loaded.end)
    params = {"exchange": exchange, "symbol": symbol, "start": start, "end": end}
    with storage_errors(engine, "checking the candles_1h roll-up"), engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT count(*) FROM candles WHERE exchange = :exchange AND symbol = :symbol AND timeframe = '1m' "
                "AND ts >= :start AND ts < :end"
            ),
            params,
        ).scalar_one()
        rolled = conn.execute(
            text(
                f"SELECT coalesce(sum(bar_count), 0) FROM {timeseries.CANDLES_1H_VIEW} "
                "WHERE exchange = :exchange AND symbol = :symbol AND ts >= :start AND ts < :end"
            ),
            params,
        ).scalar_one()
    return bool(int(stored) != int(rolled))


def refresh(engine: Engine, *, start: datetime | None = None, end: datetime | None = None) -> bool:
    """Refresh the maintained roll-ups; autocommit because TimescaleDB refuses a transaction here. False when
    ``engine``'s role may not (TimescaleDB, not the aggregate's owner: its policy will)."""
    with (
        storage_errors(engine, "refreshing the candles_1h roll-up"),
        engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
    ):
        return timeseries.refresh_candle_rollups(conn, start=start, end=end)


def stored_timeframes(conn: Connection, exchange: str, symbol: str) -> list[str]:
    return list(
        conn.execute(
            text("SELECT DISTINCT timeframe FROM candles WHERE exchange = :e AND symbol = :s"),
            {"e": exchange, "s": symbol},
        ).scalars()
    )


def read_candles(
    engine: Engine,
    *,
    exchange: str,
    symbol: str,
    timeframe: str,
    start: datetime | None = None,
    end: datetime | None = None,
    stored_timeframe: str | None = None,
    use_view: bool = True,
) -> list[StoredCandle]:
    """Candles at ``timeframe``: stored ones as they are, or rolled up by the database from a finer stored
    timeframe that divides it. 1h from 1m is read from the maintained ``candles_1h`` roll-up when
    ``use_view`` is true (and rolled up on the fly otherwise).
    """
    target = parse_timeframe(timeframe)
    with engine.connect() as conn:
        # Roll-ups scan many rows; JIT compilation costs more than it saves there (STACK-NOTES.md).
        conn.exec_driver_sql("SET LOCAL jit = off")
        available = stored_timeframes(conn, exchange, symbol)
        if not available:
            raise DataValidationError(f"no candles stored for {exchange} {symbol}", reason="no_data")
        params: dict[str, Any] = {"exchange": exchange, "symbol": symbol, "start": start, "end": end}
        if stored_timeframe is None and target.value in available:
            base = target
        else:
            base = _finest_divisor(available, target, stored_timeframe)
        if base == target:
            rows = conn.execute(
                text(
                    "SELECT exchange, symbol, ts, open, high, low, close, volume, 1 AS bar_count FROM candles "
                    "WHERE exchange = :exchange AND symbol = :symbol AND timeframe = :timeframe "
                    "AND (CAST(:start AS timestamptz) IS NULL OR ts >= :start) "
                    "AND (CAST(:end AS timestamptz) IS NULL OR ts < :end) ORDER BY ts"
                ),
                {**params, "timeframe": base.value},
            ).all()
        elif use_view and base.value == "1m" and target.delta.total_seconds() == 3600:
            rows = conn.execute(text(timeseries.candles_1h_view_sql()), params).all()
        else:
            flavour = timeseries.detect_flavour(conn)
            rows = conn.execute(
                text(timeseries.rollup_candles_sql(flavour, target.delta)), {**params, "timeframe": base.value}
            ).all()
    return [
        StoredCandle(r.exchange, r.symbol, target.value, r.ts, r.open, r.high, r.low, r.close, r.volume, r.bar_count)
        for r in rows
    ]


def _finest_divisor(available: list[str], target: Timeframe, requested: str | None) -> Timeframe:
    candidates = [parse_timeframe(tf) for tf in ([requested] if requested else available)]
    usable = [tf for tf in candidates if tf.value in available and target.delta % tf.delta == timedelta(0)]
    if not usable:
        raise DataValidationError(
            f"cannot build {target} candles: stored timeframes are {', '.join(sorted(available))}, "
            f"and {target} is not a multiple of any of them",
            reason="timeframe_not_multiple",
        )
    return min(usable, key=lambda tf: tf.delta)


def candle_summary(engine: Engine) -> list[dict[str, Any]]:
    """What is stored: one row per exchange, symbol and timeframe."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT exchange, symbol, timeframe, count(*) AS bars, min(ts) AS first, max(ts) AS last "
                "FROM candles GROUP BY exchange, symbol, timeframe ORDER BY exchange, symbol, timeframe"
            )
        ).mappings()
        return [dict(r) for r in rows]
