"""ccxt's own binance classes (REST: ccxt.async_support, websockets: ccxt.pro) against the emulator.

No mocks: real HTTP and WebSocket on 127.0.0.1, real ccxt parsing, fills from ``meltica.matching``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import ccxt.pro as ccxt_pro
import pytest

from meltica.emulator import EmulatorConfig, EmulatorServer, ccxt_config

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
TRADES = DATA / "btcusdt-trades.parquet"
DEPTH_SNAP = DATA / "btcusdt-depth-snap.csv"
DEPTH_UPDATE = DATA / "btcusdt-depth-update.csv"
KEY, SECRET = "test-key-1", "test-secret-1"
START = {"USDT": Decimal(10_000), "BTC": Decimal(1)}


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout=20))


def config(**kwargs: Any) -> EmulatorConfig:
    kwargs.setdefault("default_balances", dict(START))
    return EmulatorConfig.single(KEY, SECRET, **kwargs)


async def collect_orders(pro: Any, sink: list[dict[str, Any]]) -> None:
    while True:
        orders = await pro.watch_orders("BTC/USDT")
        sink.extend(orders)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_full_cycle_rest_and_user_stream() -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[TRADES])) as emu:
            await emu.step(20)  # a last price: the engine derives a synthetic book from it
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            pro = ccxt_pro.binance(ccxt_config(emu, KEY, SECRET))
            updates: list[dict[str, Any]] = []
            watcher: asyncio.Task[None] | None = None
            try:
                markets = await rest.load_markets()
                assert "BTC/USDT" in markets
                market = markets["BTC/USDT"]
                assert market["precision"]["price"] == 0.01 and market["limits"]["cost"]["min"] == 5
                balance = await rest.fetch_balance()
                assert balance["USDT"]["free"] == 10_000 and balance["BTC"]["free"] == 1

                await pro.load_markets()
                watcher = asyncio.create_task(collect_orders(pro, updates))
                await wait_for(lambda: sum(emu.user_subscriptions().values()) >= 1)  # user-data subscription is live

                market_buy = await rest.create_order("BTC/USDT", "market", "buy", 0.01)
                assert market_buy["status"] == "closed" and market_buy["filled"] == 0.01
                market_sell = await rest.create_order("BTC/USDT", "market", "sell", 0.004)
                assert market_sell["status"] == "closed"

                limit = await rest.create_order("BTC/USDT", "limit", "buy", 0.01, 30_000)
                assert limit["status"] == "open"
                stop_limit = await rest.create_order(
                    "BTC/USDT", "limit", "sell", 0.002, 34_000, {"triggerPrice": 35_000}
                )
                assert stop_limit["info"]["type"] == "STOP_LOSS_LIMIT"
                iceberg = await rest.create_order("BTC/USDT", "limit", "buy", 0.01, 29_000, {"icebergQty": 0.002})
                trailing = await rest.create_order(
                    "BTC/USDT",
                    "market",
                    "sell",
                    0.001,
                    None,
                    {"trailingPercent": 1, "stopLossOrTakeProfit": "stopLoss"},
                )
                assert trailing["info"]["type"] == "STOP_LOSS"

                opened = await rest.fetch_open_orders("BTC/USDT")
                assert {o["id"] for o in opened} == {limit["id"], stop_limit["id"], iceberg["id"], trailing["id"]}
                got_iceberg = await rest.fetch_order(iceberg["id"], "BTC/USDT")
                assert got_iceberg["info"]["icebergQty"] == "0.00200000"
                got_trailing = await rest.fetch_order(trailing["id"], "BTC/USDT")
                assert got_trailing["info"]["trailingDelta"] == 100

                edited = await rest.edit_order(limit["id"], "BTC/USDT", "limit", "buy", 0.02, 31_000)
                assert edited["id"] != limit["id"] and edited["amount"] == 0.02 and edited["price"] == 31_000
                old = await rest.fetch_order(limit["id"], "BTC/USDT")
                assert old["status"] == "canceled"

                cancelled = await rest.cancel_order(edited["id"], "BTC/USDT")
                assert cancelled["status"] == "canceled"
                await rest.cancel_all_orders("BTC/USDT")
                assert await rest.fetch_open_orders("BTC/USDT") == []

                # the user stream saw every order, with its final state
                wanted = {market_buy["id"], market_sell["id"], limit["id"], stop_limit["id"], iceberg["id"]}
                wanted |= {trailing["id"], edited["id"]}
                await wait_for(lambda: wanted <= {o["id"] for o in updates})
                final = {o["id"]: o["status"] for o in updates}
                assert final[market_buy["id"]] == "closed"
                assert final[edited["id"]] == "canceled" and final[iceberg["id"]] == "canceled"

                # balances reconcile with the fills to the last decimal
                trades = await rest.fetch_my_trades("BTC/USDT")
                assert len(trades) >= 2
                expected = defaultdict(Decimal, START)
                for t in trades:
                    info = t["info"]
                    qty, quote = Decimal(info["qty"]), Decimal(info["quoteQty"])
                    if info["isBuyer"]:
                        expected["BTC"] += qty
                        expected["USDT"] -= quote
                    else:
                        expected["BTC"] -= qty
                        expected["USDT"] += quote
                    expected[info["commissionAsset"]] -= Decimal(info["commission"])
                account = await rest.private_get_account()
                final_balances = {b["asset"]: Decimal(b["free"]) + Decimal(b["locked"]) for b in account["balances"]}
                for asset in ("BTC", "USDT"):
                    assert final_balances[asset] == expected[asset], asset
                    assert Decimal(next(b for b in account["balances"] if b["asset"] == asset)["locked"]) == 0
            finally:
                if watcher is not None:
                    watcher.cancel()
                await rest.close()
                await pro.close()

    run(body)


def test_errors_map_to_ccxt_exceptions() -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[TRADES])) as emu:
            await emu.step(5)
            good = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            bad_secret = ccxt_async.binance(ccxt_config(emu, KEY, "wrong"))
            bad_key = ccxt_async.binance(ccxt_config(emu, "nobody", SECRET))
            try:
                await good.load_markets()
                bad_secret.markets = good.markets
                bad_secret.markets_by_id = good.markets_by_id
                bad_key.markets = good.markets
                bad_key.markets_by_id = good.markets_by_id
                with pytest.raises(ccxt.AuthenticationError):
                    await bad_secret.fetch_balance()
                with pytest.raises(ccxt.AuthenticationError):
                    await bad_key.fetch_balance()
                with pytest.raises(ccxt.InsufficientFunds):
                    await good.create_order("BTC/USDT", "limit", "buy", 1, 30_000)  # 30 000 USDT > 10 000
                with pytest.raises(ccxt.InvalidOrder):  # below minPrice: "Filter failure: PRICE_FILTER"
                    await good.create_order("BTC/USDT", "limit", "buy", 0.001, 0.001)
                with pytest.raises(ccxt.InvalidOrder):  # LIMIT_MAKER that would take
                    await good.create_order("BTC/USDT", "limit", "buy", 0.001, 45_000, {"postOnly": True})
                with pytest.raises(ccxt.OrderNotFound):
                    await good.fetch_order("123456", "BTC/USDT")
                with pytest.raises(ccxt.OrderNotFound):
                    await good.cancel_order("123456", "BTC/USDT")
            finally:
                for ex in (good, bad_secret, bad_key):
                    await ex.close()

    run(body)


def test_watch_trades_receives_replayed_trades() -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[TRADES])) as emu:
            pro = ccxt_pro.binance(ccxt_config(emu))
            try:
                await pro.load_markets()
                task = asyncio.create_task(pro.watch_trades("BTC/USDT"))
                await wait_for(lambda: emu.hub.has_subscribers("btcusdt@trade"))
                await emu.step(3)
                trades = await asyncio.wait_for(task, 5)
                assert trades and trades[0]["symbol"] == "BTC/USDT"
                assert trades[0]["id"] == "553287559" and trades[0]["price"] == 39432.48
            finally:
                await pro.close()

    run(body)


def test_watch_order_book_syncs_with_replayed_depth() -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[DEPTH_SNAP, DEPTH_UPDATE])) as emu:
            pro = ccxt_pro.binance(ccxt_config(emu))
            try:
                await pro.load_markets()
                await emu.step(1)  # the recorded snapshot (bids only)
                task = asyncio.create_task(pro.watch_order_book("BTC/USDT"))
                await wait_for(lambda: emu.hub.has_subscribers("btcusdt@depth@100ms"))
                # ccxt fetches the REST snapshot after the subscription ack; the diff must come after it.
                await wait_for(lambda: (pro.orderbooks.get("BTC/USDT") or {}).get("nonce") is not None)
                await emu.step(1)  # the recorded diff (adds the asks)
                book = await asyncio.wait_for(task, 5)
                while not book["asks"]:
                    book = await asyncio.wait_for(pro.watch_order_book("BTC/USDT"), 5)
                expected = emu.engine.book("BTCUSDT")
                assert book["bids"][0][0] == float(expected.bids[0][0])
                assert book["asks"][0][0] == float(expected.asks[0][0])
                assert len(book["bids"]) == len(expected.bids)
            finally:
                await pro.close()

    run(body)
