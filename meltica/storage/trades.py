"""Public trades in the database: bulk COPY loads (idempotent) and the resume point of a series."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, text

from meltica.domain import Trade
from meltica.errors import DataValidationError


@dataclass(frozen=True)
class TradeLoadResult:
    read: int
    inserted: int
    start: datetime | None
    end: datetime | None

    @property
    def already_stored(self) -> int:
        return self.read - self.inserted


def load_trades(engine: Engine, trades: Sequence[Trade]) -> TradeLoadResult:
    """Store ``trades`` with COPY in one transaction; trades already stored (same natural key
    ``exchange, symbol, ts, trade_id``) are skipped, so a reload adds nothing.

    COPY cannot skip conflicts itself: it fills a temporary stage, and ``INSERT … ON CONFLICT DO
    NOTHING`` moves the new rows over (the same pattern as ``meltica.storage.candles``).
    """
    if any(not t.exchange or not t.symbol for t in trades):
        raise DataValidationError("exchange and symbol are required to load trades")
    if not trades:
        return TradeLoadResult(read=0, inserted=0, start=None, end=None)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE trades_stage (LIKE trades INCLUDING DEFAULTS) ON COMMIT DROP")
        raw = conn.connection.driver_connection
        assert raw is not None
        copy_sql = "COPY trades_stage (exchange, symbol, ts, trade_id, price, amount, side) FROM STDIN"
        with raw.cursor() as cur, cur.copy(copy_sql) as copy:
            for t in trades:
                side = t.aggressor_side.value if t.aggressor_side is not None else None
                copy.write_row((t.exchange, t.symbol, t.ts, t.trade_id, t.price, t.quantity, side))
        inserted = conn.exec_driver_sql(
            "INSERT INTO trades SELECT * FROM trades_stage ORDER BY ts ON CONFLICT DO NOTHING"
        ).rowcount
    return TradeLoadResult(
        read=len(trades),
        inserted=inserted,
        start=min(t.ts for t in trades),
        end=max(t.ts for t in trades),
    )


def last_trade_ts(engine: Engine, exchange: str, symbol: str) -> datetime | None:
    """Time of the newest stored trade of ``exchange``/``symbol`` (where an ingestion resumes)."""
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT max(ts) FROM trades WHERE exchange = :e AND symbol = :s"), {"e": exchange, "s": symbol}
        ).scalar()
    return value if isinstance(value, datetime) else None


def count_trades(engine: Engine, exchange: str, symbol: str) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT count(*) FROM trades WHERE exchange = :e AND symbol = :s"), {"e": exchange, "s": symbol}
        ).scalar()
    return int(value or 0)
