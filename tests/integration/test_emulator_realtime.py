"""The emulator as a real-time venue: recorded bars replayed shifted to the wall clock, played as public
trades along their path, tickers pushed — checked with ccxt's own binance classes (REST and ccxt.pro)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt.async_support as ccxt_async
import ccxt.pro as ccxt_pro
import pytest

from meltica.emulator import EmulatorConfig, EmulatorServer, ccxt_config

pytestmark = pytest.mark.integration

CANDLES = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
FIRST_BAR = (Decimal("46319.0"), Decimal("46385.0"), Decimal("46319.0"), Decimal("46377.0"))  # the file's first row
KEY, SECRET = "rt-key", "rt-secret"
MINUTE_MS = 60_000


def run(body: Callable[[], Awaitable[None]], timeout: float = 40) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=timeout))


def wall_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def realtime(**kwargs: Any) -> EmulatorConfig:
    kwargs.setdefault("default_balances", {"USDT": Decimal(100_000), "BTC": Decimal(1)})
    return EmulatorConfig.single(KEY, SECRET, data=[CANDLES], realtime=True, **kwargs)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def read_stream(emu: EmulatorServer, streams: list[str], sink: list[dict[str, Any]]) -> None:
    """Raw combined-stream messages (``{"stream", "data"}``), to check Binance's message shapes."""
    url = f"{emu.ws_url}/stream?streams={'/'.join(streams)}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        async for msg in ws:
            sink.append(json.loads(msg.data))


def test_times_agree_with_the_wall_clock_at_speed_one() -> None:
    async def body() -> None:
        async with EmulatorServer(realtime()) as emu:
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await rest.load_markets()
                before = wall_ms()
                server_time = await rest.fetch_time()
                order = await rest.create_order("BTC/USDT", "market", "buy", 0.01)
                after = wall_ms()
                assert before <= server_time <= after
                assert order["status"] == "closed"
                assert before <= order["timestamp"] <= after  # transactTime
                fetched = await rest.fetch_order(order["id"], "BTC/USDT")
                assert before <= fetched["lastUpdateTimestamp"] <= after  # updateTime
                (fill,) = await rest.fetch_my_trades("BTC/USDT")
                assert fill["timestamp"] == order["timestamp"]

                # the first recorded bar opened at now floored to the minute; its path is printing
                candles = await rest.fetch_ohlcv("BTC/USDT", "1m", limit=5)
                first = candles[0]
                assert first[0] % MINUTE_MS == 0 and before - MINUTE_MS < first[0] <= after
                assert Decimal(str(first[1])) == FIRST_BAR[0]
                public = await rest.fetch_trades("BTC/USDT", limit=10)
                assert public[0]["timestamp"] == first[0] and Decimal(str(public[0]["price"])) == FIRST_BAR[0]
                assert all(first[0] <= t["timestamp"] <= after for t in public)
                assert any(t["id"] == str(fill["info"]["id"]) for t in public)  # our fill is a public trade

                ticker = await rest.fetch_ticker("BTC/USDT")
                assert before <= ticker["timestamp"] <= wall_ms()
                assert ticker["last"] == public[-1]["price"]
            finally:
                await rest.close()

    run(body)


def test_bars_become_trades_that_rebuild_the_klines() -> None:
    """At speed 60 a 1m bar lasts a second: a trade-driven candle aggregator (trades by minute) and the
    venue's klines — REST and the closed ``@kline_1m`` events — agree to the last decimal."""

    async def body() -> None:
        async with EmulatorServer(realtime(speed=60)) as emu:
            pro = ccxt_pro.binance(ccxt_config(emu))
            rest = ccxt_async.binance(ccxt_config(emu))
            raw: list[dict[str, Any]] = []
            trades: list[dict[str, Any]] = []
            reader = asyncio.create_task(read_stream(emu, ["btcusdt@kline_1m", "btcusdt@aggTrade"], raw))

            async def collect() -> None:
                while True:
                    trades.extend(await pro.watch_trades("BTC/USDT"))

            collector: asyncio.Task[None] | None = None
            try:
                await pro.load_markets()
                await rest.load_markets()
                collector = asyncio.create_task(collect())
                await wait_for(lambda: emu.hub.has_subscribers("btcusdt@trade"))

                def closed_klines() -> list[dict[str, Any]]:
                    return [m["data"]["k"] for m in raw if m["stream"].endswith("kline_1m") and m["data"]["k"]["x"]]

                # three bars whose every trade we saw: their open arrived after our subscription
                await wait_for(lambda: len(closed_klines()) >= 5, timeout=20)
                by_minute: dict[int, list[dict[str, Any]]] = {}
                for t in sorted(trades, key=lambda t: int(t["id"])):
                    by_minute.setdefault(t["timestamp"] // MINUTE_MS * MINUTE_MS, []).append(t)
                complete = [k for k in closed_klines() if by_minute.get(k["t"], [{}])[0].get("timestamp") == k["t"]]
                assert len(complete) >= 3
                venue = {row[0]: row for row in await rest.fetch_ohlcv("BTC/USDT", "1m", limit=1000)}
                for k in complete:
                    bucket = by_minute[k["t"]]
                    prices = [Decimal(t["info"]["p"]) for t in bucket]
                    volume = sum((Decimal(t["info"]["q"]) for t in bucket), Decimal(0))
                    aggregated = (prices[0], max(prices), min(prices), prices[-1], volume)
                    streamed = tuple(Decimal(k[f]) for f in ("o", "h", "l", "c", "v"))
                    assert aggregated == streamed, k["t"]
                    row = venue[k["t"]]
                    assert tuple(Decimal(str(v)) for v in row[1:6]) == aggregated
                    assert k["T"] == k["t"] + MINUTE_MS - 1 and bucket[-1]["timestamp"] <= k["T"]
                # the aggTrade stream and REST carry the same trades
                agg = [m["data"] for m in raw if m["stream"].endswith("aggTrade")]
                seen_ids = {int(t["id"]) for t in trades}
                assert {a["a"] for a in agg} & seen_ids
                rest_agg = await rest.public_get_aggtrades({"symbol": "BTCUSDT", "limit": 20})
                assert {int(a["a"]) for a in rest_agg} & seen_ids
            finally:
                for task in (reader, collector):
                    if task is not None:
                        task.cancel()
                await pro.close()
                await rest.close()

    run(body)


MINI_KEYS = {"e", "E", "s", "c", "o", "h", "l", "v", "q"}
TICKER_KEYS = MINI_KEYS | {"p", "P", "w", "x", "Q", "b", "B", "a", "A", "O", "C", "F", "L", "n"}


def test_ticker_streams_through_ccxt_pro() -> None:
    async def body() -> None:
        async with EmulatorServer(realtime(speed=60, ticker_interval_s=0.2)) as emu:
            pro = ccxt_pro.binance(ccxt_config(emu))
            rest = ccxt_async.binance(ccxt_config(emu))
            raw: list[dict[str, Any]] = []
            streams = ["btcusdt@ticker", "btcusdt@miniTicker", "!miniTicker@arr", "btcusdt@bookTicker"]
            reader = asyncio.create_task(read_stream(emu, streams, raw))
            try:
                await pro.load_markets()
                await rest.load_markets()
                ticker = await asyncio.wait_for(pro.watch_ticker("BTC/USDT"), 5)
                assert ticker["symbol"] == "BTC/USDT" and ticker["last"] > 0
                assert abs(ticker["timestamp"] - emu.market_ms()) < 5 * MINUTE_MS  # market time, not 2022
                full = await asyncio.wait_for(pro.watch_ticker("BTC/USDT", {"name": "ticker"}), 5)
                assert full["bid"] is not None and full["ask"] is not None and full["bid"] < full["ask"]
                every = await asyncio.wait_for(pro.watch_tickers(), 5)  # !miniTicker@arr
                assert "BTC/USDT" in every
                some = await asyncio.wait_for(pro.watch_tickers(["BTC/USDT"]), 5)
                assert set(some) == {"BTC/USDT"}
                quotes = await asyncio.wait_for(pro.watch_bids_asks(["BTC/USDT"]), 5)
                assert quotes["BTC/USDT"]["bid"] < quotes["BTC/USDT"]["ask"]

                # REST agrees with the last trade; the book ticker with the book
                last_trade = (await rest.fetch_trades("BTC/USDT", limit=1))[-1]
                rest_ticker = await rest.fetch_ticker("BTC/USDT")
                assert rest_ticker["last"] is not None and rest_ticker["high"] >= rest_ticker["low"]
                assert rest_ticker["timestamp"] >= last_trade["timestamp"]
                book = await rest.public_get_ticker_bookticker({"symbol": "BTCUSDT"})
                assert set(book) == {"symbol", "bidPrice", "bidQty", "askPrice", "askQty"}
                mini = await rest.public_get_ticker_24hr({"symbol": "BTCUSDT", "type": "MINI"})
                assert "bidPrice" not in mini and mini["lastPrice"]

                # Binance's message shapes (web-socket-streams.md)
                await wait_for(lambda: {m["stream"] for m in raw} >= set(streams))
                for message in raw:
                    data = message["data"]
                    if message["stream"] == "btcusdt@ticker":
                        assert set(data) == TICKER_KEYS and data["e"] == "24hrTicker"
                    elif message["stream"] == "btcusdt@miniTicker":
                        assert set(data) == MINI_KEYS and data["e"] == "24hrMiniTicker"
                    elif message["stream"] == "!miniTicker@arr":
                        assert isinstance(data, list) and all(set(d) == MINI_KEYS for d in data)
                    else:
                        assert set(data) == {"u", "s", "b", "B", "a", "A"}
            finally:
                reader.cancel()
                await pro.close()
                await rest.close()

    run(body)
