"""OMS + risk engine + kill switch + portfolio against the Binance emulator through the ccxt adapter.

The kill switch end to end: with open orders on the venue, turning it on cancels them all and blocks
new intents; its state survives a restart (a new process's KillSwitch reads it from PostgreSQL).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.ccxt import CcxtAdapter
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.execution import OrderManager, OrderStore
from meltica.portfolio import Portfolio
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, RiskConfig, RiskEngine, RiskRecorder

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
KEY, SECRET = "e2e-key", "e2e-secret"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def intent(n: int, price: str, **kw: Any) -> OrderIntent:
    fields: dict[str, Any] = {
        "intent_id": f"e2e-{n}",
        "account": "main",
        "strategy": "e2e",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "quantity": Decimal("0.01"),
        "price": Decimal(price),
        "created_at": T0,
    }
    fields.update(kw)
    return OrderIntent(**fields)


async def wiring(db: Engine, emu: EmulatorServer) -> tuple[OrderManager, CcxtAdapter, KillSwitch, RiskEngine]:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
    )
    assert isinstance(adapter, CcxtAdapter)
    await adapter.connect()
    instruments = await adapter.load_instruments()
    portfolio = Portfolio(valuation_currency="USDT")
    switch = KillSwitch(KillSwitchStore(db))
    risk = RiskEngine(
        RiskConfig(max_order_notional=Decimal(5000), max_open_orders=10, price_band_bps=Decimal(5000)),
        portfolio,
        instruments={("binance", s): i for s, i in instruments.items()},
        kill_switch=switch,
        recorder=RiskRecorder(db, batch_size=1),
    )
    ticker = await adapter.fetch_ticker("BTC/USDT")
    assert ticker.last is not None
    risk.on_market("binance", "BTC/USDT", ticker.last, bid=ticker.bid, ask=ticker.ask)
    oms = OrderManager(
        OrderStore(db),
        {"main": adapter},
        clock=lambda: datetime.now(UTC),
        risk=risk,
        portfolio=portfolio,
        kill_switch=switch,
    )
    await oms.start()
    return oms, adapter, switch, risk


def test_kill_switch_halt_cancels_venue_orders_blocks_intents_and_survives_restart(fresh_database: Engine) -> None:
    async def body() -> None:
        emu = EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[DATA / "btcusdt-trades.parquet"]))
        await emu.start()
        try:
            await emu.step(20)
            oms, adapter, switch, _risk = await wiring(fresh_database, emu)
            last = (await adapter.fetch_ticker("BTC/USDT")).last
            assert last is not None
            placed = []
            for n in range(3):
                order = await oms.submit(intent(n, str((last * Decimal("0.95")).quantize(Decimal("0.01")) - n)))
                assert order.status is OrderStatus.OPEN, order.reason
                placed.append(order.client_order_id)
            assert len(await adapter.fetch_open_orders("BTC/USDT")) == 3

            # A risk rejection is stored with its reason, and nothing reaches the venue.
            too_big = await oms.submit(intent(10, str(last.quantize(Decimal("0.01"))), quantity=Decimal("1")))
            assert too_big.status is OrderStatus.REJECTED
            assert "max_order_notional" in (too_big.reason or "")

            switch.engage(KillSwitchMode.HALT, reason="e2e test", actor="pytest")
            blocked = await oms.submit(intent(11, str((last * Decimal("0.9")).quantize(Decimal("0.01")))))
            # The venue confirms the cancels asynchronously: poll it, bounded by a deadline (not a speed claim).
            deadline = time.monotonic() + 30
            while await adapter.fetch_open_orders("BTC/USDT"):
                assert time.monotonic() < deadline, "the venue still has open orders 30 s after the halt"
                await asyncio.sleep(0.02)
            assert blocked.status is OrderStatus.REJECTED
            for coid in placed:
                assert oms.order(coid).status is OrderStatus.CANCELLED
            await oms.stop()
            await adapter.close()

            # Restart: a new kill switch from the same database is still halted; a new OMS refuses.
            oms2, adapter2, switch2, _ = await wiring(fresh_database, emu)
            assert switch2.state.mode is KillSwitchMode.HALT
            again = await oms2.submit(intent(12, str((last * Decimal("0.9")).quantize(Decimal("0.01")))))
            assert again.status is OrderStatus.REJECTED
            assert not await adapter2.fetch_open_orders("BTC/USDT")
            switch2.release(actor="pytest", reason="e2e done")
            resumed = await oms2.submit(intent(13, str((last * Decimal("0.9")).quantize(Decimal("0.01")))))
            assert resumed.status is OrderStatus.OPEN
            await oms2.stop()
            await adapter2.close()
        finally:
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 90))
    with fresh_database.connect() as conn:
        decisions = dict(conn.execute(text("SELECT decision, count(*) FROM risk_events GROUP BY decision")).all())
        stored = dict(conn.execute(text("SELECT status, count(*) FROM orders GROUP BY status")).all())
    assert decisions.get("kill_switch_on") == 1
    assert decisions.get("kill_switch_off") == 1
    assert decisions.get("rejected", 0) >= 1
    assert stored.get("cancelled") == 3
    assert stored.get("open") == 1
