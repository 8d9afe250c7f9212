"""Trade ingestion (``ingest_trades``) from the Binance emulator through ccxt into real PostgreSQL:
paged (ccxt's fetchTrades(since) → /api/v3/aggTrades), resumed, idempotent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.registry import create_adapter
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.marketdata.ingest import ingest_trades

pytestmark = pytest.mark.integration

TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"


def stored(engine: Engine) -> list[tuple[str, object, object]]:
    with engine.connect() as conn:
        return [
            tuple(r) for r in conn.execute(text("SELECT trade_id, price, amount FROM trades ORDER BY ts, trade_id"))
        ]


def test_trades_are_paged_resumed_and_loaded_once(fresh_database: Engine) -> None:
    async def body() -> None:
        emu = EmulatorServer(EmulatorConfig.single("k", "s", data=[TRADES]))
        await emu.start()
        adapter = create_adapter("binance", account="public", urls={"api": emu.ccxt_urls()}, options=dict(CCXT_OPTIONS))
        try:
            await emu.step(400)
            await adapter.connect()
            venue = emu.markets["BTCUSDT"].trades
            expected = {str(t.trade_id): (t.price, t.quantity) for t in venue}
            start = datetime.fromtimestamp(venue[0].time_ms / 1000, UTC)

            report = await ingest_trades(adapter, fresh_database, "BTC/USDT", start=start, page_limit=90)
            assert report.pages > 1
            rows = stored(fresh_database)
            assert {r[0]: (r[1], r[2]) for r in rows} == expected
            assert report.inserted == len(expected)

            again = await ingest_trades(adapter, fresh_database, "BTC/USDT", start=start, page_limit=90)
            assert again.inserted == 0

            await emu.step(150)  # the venue trades on: only the new prints are added
            more = await ingest_trades(adapter, fresh_database, "BTC/USDT", start=start, page_limit=90)
            new_ids = {str(t.trade_id) for t in emu.markets["BTCUSDT"].trades} - set(expected)
            assert more.inserted == len(new_ids) > 0
            assert {r[0] for r in stored(fresh_database)} == set(expected) | new_ids
        finally:
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 120))
