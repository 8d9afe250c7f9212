"""Top of book and the order book through ``MarketDataIngest`` with ccxt's own ``binance`` pro class
against the emulator: ``ticker`` (Binance ``bookTicker`` via ``watch_bids_asks``) → ``TopOfBook`` on
``md.ticker``; ``book`` (``watch_order_book``: REST snapshot + diffs) → ``md.book``. The book moves with
resting orders another client places; every websocket is dropped while it moves: after the reconnect the
book is re-snapshotted and both streams end equal to the emulator's book."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meltica.domain import OrderBookSnapshot, TopOfBook
from meltica.live.marketdata import MarketDataIngest, Subscription
from meltica.live.processor import Outgoing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEPTH_SNAP = Path(__file__).resolve().parents[1] / "data" / "binance"
DEPTH_SNAP = DEPTH_SNAP / "btcusdt-depth-snap.csv"


async def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_ticker_and_book_survive_a_dropped_websocket_and_resnapshot() -> None:
    import ccxt.async_support as ccxt_async

    from meltica.adapters.ccxt.adapter import StreamPolicy
    from meltica.adapters.registry import create_adapter
    from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer, ccxt_config

    async def scenario() -> dict[str, Any]:
        emulator = EmulatorServer(EmulatorConfig.single("k", "s", symbols=["BTCUSDT"], data=[DEPTH_SNAP]))
        await emulator.start()
        await emulator.step(1)  # the recorded snapshot: bids only
        trader = ccxt_async.binance(ccxt_config(emulator, "k", "s"))
        adapter = create_adapter(
            "binance", account="md", urls={"api": emulator.ccxt_urls()}, options=CCXT_OPTIONS,
            streams=StreamPolicy(stale_after=None),
        )  # fmt: skip
        published: list[Outgoing] = []

        async def emit(out: Outgoing) -> None:
            published.append(out)

        def last(kind: type) -> Any:
            return next((o.value for o in reversed(published) if isinstance(o.value, kind)), None)

        ingest = MarketDataIngest(
            {"binance": adapter},
            subscriptions=[Subscription("binance", "BTC/USDT", "ticker"), Subscription("binance", "BTC/USDT", "book")],
        )

        def listening(old: set[Any]) -> bool:
            streams = ("btcusdt@bookTicker", "btcusdt@depth@100ms")
            return all(any(s in c.streams and c not in old for c in emulator.hub.connections) for s in streams)

        def engine_top() -> tuple[Decimal, Decimal]:
            book = emulator.engine.book("BTCUSDT")
            return book.bids[0][0], book.asks[0][0]

        async def sell(price: str) -> None:
            await trader.create_order("BTC/USDT", "limit", "sell", 0.01, float(price))

        def ask_is(price: str) -> Callable[[], bool]:
            def check() -> bool:
                top, book = last(TopOfBook), last(OrderBookSnapshot)
                return (
                    top is not None and top.ask == Decimal(price)
                    and book is not None and book.asks and book.asks[0].price == Decimal(price)
                )  # fmt: skip

            return check

        try:
            await trader.load_markets()
            await ingest.start(emit)
            await _wait(lambda: listening(set()), "the ticker and book subscriptions")
            for price in ("20500", "20450", "20420", "20410"):
                await sell(price)
                await _wait(ask_is(price), f"best ask {price} on md.ticker and md.book")
            dropped = set(emulator.hub.connections)
            await emulator.drop_websockets()
            for price in ("20405", "20404"):  # the book changes while nobody listens
                await sell(price)
            await _wait(lambda: listening(dropped), "the resubscriptions")
            await sell("20403")
            await _wait(ask_is("20403"), "best ask 20403 after the reconnect")
            book = emulator.engine.book("BTCUSDT")
            return {
                "top": last(TopOfBook),
                "book": last(OrderBookSnapshot),
                "engine_top": engine_top(),
                "engine_asks": [(p, q) for p, q in book.asks[:20]],
                "engine_bids": [(p, q) for p, q in book.bids[:20]],
                "failures": dict(ingest.failures),
            }
        finally:
            await ingest.stop()
            await trader.close()
            await emulator.stop()

    got = asyncio.run(scenario())
    assert got["failures"] == {}
    top: TopOfBook = got["top"]
    assert (top.bid, top.ask) == got["engine_top"]
    assert top.ask_quantity == Decimal("0.01")
    book: OrderBookSnapshot = got["book"]
    # the orders placed during the drop are in: the book was re-snapshotted, not patched from a gap
    assert [(level.price, level.quantity) for level in book.asks] == got["engine_asks"]
    assert [(level.price, level.quantity) for level in book.bids] == got["engine_bids"]
    assert [level.price for level in book.asks][:3] == [Decimal("20403"), Decimal("20404"), Decimal("20405")]
