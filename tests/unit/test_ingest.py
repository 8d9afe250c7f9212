"""Ingestion paging without I/O: a stand-in venue and a recording store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
from sqlalchemy import Engine

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Bar
from meltica.domain.timeframe import Timeframe
from meltica.errors import ConfigurationError
from meltica.marketdata import ingest

T0 = datetime(2022, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def bar(i: int) -> Bar:
    return Bar(
        exchange="binance",
        symbol="BTC/USDT",
        timeframe="1m",
        ts=T0 + i * MINUTE,
        open=Decimal(100),
        high=Decimal(101),
        low=Decimal(99),
        close=Decimal(100),
        volume=Decimal(1),
    )


class Venue:
    def __init__(self, n: int) -> None:
        self.bars = [bar(i) for i in range(n)]
        self.calls: list[datetime | None] = []

    @property
    def exchange_id(self) -> str:
        return "binance"

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Bar]:
        self.calls.append(since)
        rows = [b for b in self.bars if since is None or b.ts >= since]
        return rows[: limit or 500]


def test_pages_until_a_short_page_and_stores_each(monkeypatch: pytest.MonkeyPatch) -> None:
    stored: list[int] = []

    def store(engine: Any, bars: Sequence[Bar], exchange: str, symbol: str, tf: Timeframe) -> int:
        stored.append(len(bars))
        return len(bars)

    monkeypatch.setattr(ingest, "_store_bars", store)
    venue = Venue(25)
    progress = ingest._Progress()
    inserted = asyncio.run(
        ingest._fetch_bars(
            cast(ExchangeAdapter, venue),
            cast(Engine, None),
            "BTC/USDT",
            Timeframe.parse("1m"),
            T0,
            T0 + 100 * MINUTE,
            10,
            progress,
        )
    )
    assert (inserted, stored, progress.pages) == (25, [10, 10, 5], 3)
    assert venue.calls == [T0, T0 + 10 * MINUTE, T0 + 20 * MINUTE]
    assert (progress.first, progress.last) == (T0, T0 + 24 * MINUTE)


def test_stops_at_the_end_of_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "_store_bars", lambda _e, bars, *_a: len(bars))
    venue = Venue(50)
    progress = ingest._Progress()
    inserted = asyncio.run(
        ingest._fetch_bars(
            cast(ExchangeAdapter, venue),
            cast(Engine, None),
            "BTC/USDT",
            Timeframe.parse("1m"),
            T0 + 5 * MINUTE,
            T0 + 15 * MINUTE,
            10,
            progress,
        )
    )
    assert inserted == 10
    assert venue.calls == [T0 + 5 * MINUTE]


def test_bad_arguments_are_configuration_errors() -> None:
    venue = cast(ExchangeAdapter, Venue(1))
    engine = cast(Engine, None)
    with pytest.raises(ConfigurationError):
        asyncio.run(ingest.ingest_ohlcv(venue, engine, "BTC/USDT", "1m", start=T0, page_limit=0))
    with pytest.raises(ConfigurationError, match="invalid timeframe"):
        asyncio.run(ingest.ingest_ohlcv(venue, engine, "BTC/USDT", "7x", start=T0))


def test_gap_text() -> None:
    gap = ingest.Gap(T0, T0 + 3 * MINUTE, 3)
    assert str(gap) == "2022-01-01T00:00:00+00:00 .. 2022-01-01T00:03:00+00:00 (3 bars)"
