"""The ingest's market statuses while the broker refuses them: counted, said loudly, retried, and published
once the broker is back. The ingest runs over ccxt's ``binance`` against the emulator; its ``emit`` (the
shell's producer) refuses every ``MarketStatus`` for a while, as a broker that is away does. Meanwhile the
risk gate expires the last status and refuses new orders on the market (tests/unit/test_live_risk_gate.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from kafka.errors import KafkaConnectionError

from meltica.live.marketdata import MarketDataIngest, Subscription
from meltica.live.processor import Outgoing
from meltica.messaging.schemas import MarketStatus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATA = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-depth-snap.csv"


def test_statuses_the_broker_refuses_are_counted_said_and_published_once_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from meltica.adapters.ccxt.adapter import StreamPolicy
    from meltica.adapters.registry import create_adapter
    from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer

    async def scenario() -> tuple[int, int, list[MarketStatus]]:
        emulator = EmulatorServer(EmulatorConfig.single("k", "s", symbols=["BTCUSDT"], data=[DATA]))
        await emulator.start()
        adapter = create_adapter(
            "binance", account="md", urls={"api": emulator.ccxt_urls()}, options=CCXT_OPTIONS,
            streams=StreamPolicy(stale_after=None),
        )  # fmt: skip
        broker_away = True
        published: list[MarketStatus] = []

        async def emit(out: Outgoing) -> None:
            if isinstance(out.value, MarketStatus):
                if broker_away:
                    raise KafkaConnectionError("the broker is away")
                published.append(out.value)

        ingest = MarketDataIngest(
            {"binance": adapter},
            subscriptions=[Subscription("binance", "BTC/USDT", "trades")],
            stale_after=0.4,
            heartbeat=0.1,
        )
        await ingest.start(emit)
        try:
            async with asyncio.timeout(30):
                while ingest.status_failures < 10:  # past three heartbeats of refusals
                    await asyncio.sleep(0.05)
            failed_while_away = ingest.status_failures
            broker_away = False
            async with asyncio.timeout(30):
                while not published:
                    await asyncio.sleep(0.05)
            return failed_while_away, ingest.status_failures, published
        finally:
            await ingest.stop()
            await emulator.stop()

    with caplog.at_level(logging.INFO, logger="meltica.live.marketdata"):
        failed_while_away, failures, published = asyncio.run(scenario())
    assert failed_while_away >= 10 and failures >= failed_while_away
    assert published[0].exchange == "binance" and published[0].symbol == "BTC/USDT"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "could not publish its status" in r.message]
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL and "refuses new orders" in r.message]
    assert len(errors) == 1  # said when it starts, not every round
    assert len(critical) == 1  # and once it outlasted the gate's expiry
