"""Trade ingestion (``ingest_trades``) into real PostgreSQL: paged, resumed, idempotent.

The emulator has no ``aggTrades`` endpoint (ccxt's Binance ``fetchTrades`` with ``since``), so the venue
here is a stand-in serving recorded-shaped trades by time, as a ccxt adapter does.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import cast

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Side, Trade
from meltica.marketdata.ingest import ingest_trades

pytestmark = pytest.mark.integration

T0 = datetime(2022, 1, 1, tzinfo=UTC)


class TradesVenue:
    def __init__(self, trades: list[Trade]) -> None:
        self.trades = trades
        self.calls: list[tuple[datetime | None, int | None]] = []

    @property
    def exchange_id(self) -> str:
        return "binance"

    async def fetch_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Trade]:
        self.calls.append((since, limit))
        rows = [t for t in self.trades if since is None or t.ts >= since]
        return rows[:limit] if limit else rows


def trade(n: int, ms: int) -> Trade:
    return Trade(
        exchange="binance",
        symbol="BTC/USDT",
        trade_id=str(n),
        price=Decimal("46000.5") + n,
        quantity=Decimal("0.01"),
        aggressor_side=Side.BUY if n % 2 else Side.SELL,
        ts=T0 + timedelta(milliseconds=ms),
    )


def test_trades_are_paged_resumed_and_loaded_once(fresh_database: Engine) -> None:
    # Trades 3 and 4 share a millisecond across a page boundary; 7, 8, 9 fill a whole page on one ms.
    trades = [trade(1, 0), trade(2, 10), trade(3, 20), trade(4, 20), trade(5, 30), trade(6, 40)]
    trades += [trade(7, 50), trade(8, 50), trade(9, 50), trade(10, 60)]
    venue = TradesVenue(trades)
    adapter = cast(ExchangeAdapter, venue)

    report = asyncio.run(ingest_trades(adapter, fresh_database, "BTC/USDT", start=T0, page_limit=3))
    assert report.inserted == 10
    assert (report.first, report.last) == (T0, T0 + timedelta(milliseconds=60))
    with fresh_database.connect() as conn:
        rows = conn.execute(text("SELECT trade_id, price, amount, side FROM trades ORDER BY ts, trade_id")).all()
    assert [r.trade_id for r in rows] == [str(n) for n in range(1, 11)]
    assert (rows[0].price, rows[0].amount, rows[0].side) == (Decimal("46001.5"), Decimal("0.01"), "buy")

    # A second run resumes at the newest stored trade and adds nothing.
    venue.calls.clear()
    again = asyncio.run(ingest_trades(adapter, fresh_database, "BTC/USDT", start=T0, page_limit=3))
    assert again.inserted == 0
    assert venue.calls[0][0] == T0 + timedelta(milliseconds=60)

    # New trades at the venue: only they are added.
    venue.trades.append(trade(11, 70))
    assert asyncio.run(ingest_trades(adapter, fresh_database, "BTC/USDT", start=None)).inserted == 1
