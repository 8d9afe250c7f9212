"""The emulator as a real-time venue: recorded bars replayed shifted to the wall clock, played as public
trades along their path, tickers pushed — checked with ccxt's own binance classes (REST and ccxt.pro)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import ccxt.async_support as ccxt_async
import ccxt.pro as ccxt_pro
import pytest

from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer, EmulatorThread, ccxt_config, ccxt_urls_for

pytestmark = pytest.mark.integration

MONTH = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
FIRST_BAR = (Decimal("46319.0"), Decimal("46385.0"), Decimal("46319.0"), Decimal("46377.0"))  # the file's first row
KEY, SECRET = "rt-key", "rt-secret"
MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def candles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The month's first 300 bars (a venue starts in a blink; at speed 60 they last 5 minutes)."""
    path = tmp_path_factory.mktemp("realtime") / "btc-1m.csv"
    with gzip.open(MONTH, "rt") as source:
        path.write_text("".join(line for _, line in zip(range(301), source, strict=False)))
    return path


def run(body: Callable[[], Awaitable[None]], timeout: float = 40) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=timeout))


def ccxt_config_for(url: str) -> dict[str, Any]:
    return {"urls": {"api": ccxt_urls_for(url)}, "options": dict(CCXT_OPTIONS), "enableRateLimit": False}


def wall_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def realtime(data: Path, **kwargs: Any) -> EmulatorConfig:
    kwargs.setdefault("default_balances", {"USDT": Decimal(100_000), "BTC": Decimal(1)})
    return EmulatorConfig.single(KEY, SECRET, data=[data], realtime=True, **kwargs)


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


def test_times_agree_with_the_wall_clock_at_speed_one(candles: Path) -> None:
    async def body() -> None:
        async with EmulatorServer(realtime(candles)) as emu:
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
                klines = await rest.fetch_ohlcv("BTC/USDT", "1m", limit=5)
                first = klines[0]
                assert first[0] % MINUTE_MS == 0 and before - MINUTE_MS < first[0] <= after
                assert Decimal(str(first[1])) == FIRST_BAR[0]
                public = await rest.fetch_trades("BTC/USDT", limit=10)
                assert public[0]["timestamp"] == first[0] and Decimal(str(public[0]["price"])) == FIRST_BAR[0]
                assert all(first[0] <= t["timestamp"] <= wall_ms() for t in public)
                assert any(t["id"] == str(fill["info"]["id"]) for t in public)  # our fill is a public trade

                ticker = await rest.fetch_ticker("BTC/USDT")
                assert before <= ticker["timestamp"] <= wall_ms()
                later = await rest.fetch_trades("BTC/USDT", limit=10)
                assert ticker["last"] in {t["price"] for t in later}
            finally:
                await rest.close()

    run(body)


def test_bars_become_trades_that_rebuild_the_klines(candles: Path) -> None:
    """At speed 60 a 1m bar lasts a second: a trade-driven candle aggregator (trades by minute) and the
    venue's klines — REST and the closed ``@kline_1m`` events — agree to the last decimal."""

    async def body() -> None:
        async with EmulatorServer(realtime(candles, speed=60)) as emu:
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

                def complete() -> list[dict[str, Any]]:
                    """Closed klines whose every trade we received: the open (at ``t``) to the close (at ``T``)."""
                    times = {t["timestamp"] for t in trades}
                    return [k for k in closed_klines() if k["t"] in times and k["T"] in times]

                await wait_for(lambda: len(complete()) >= 3, timeout=20)
                by_minute: dict[int, list[dict[str, Any]]] = {}
                for t in sorted(trades, key=lambda t: int(t["id"])):
                    by_minute.setdefault(t["timestamp"] // MINUTE_MS * MINUTE_MS, []).append(t)
                venue = {row[0]: row for row in await rest.fetch_ohlcv("BTC/USDT", "1m", limit=1000)}
                for k in complete():
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


def test_ticker_streams_through_ccxt_pro(candles: Path) -> None:
    async def body() -> None:
        async with EmulatorServer(realtime(candles, speed=60, ticker_interval_s=0.2)) as emu:
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


def test_cli_runs_a_realtime_venue_by_default(free_port: Callable[[], int], tmp_path: Path, candles: Path) -> None:
    port = free_port()
    log = tmp_path / "emulator.log"
    argv = [sys.executable, "-m", "meltica", "emulator", "binance", "--port", str(port)]
    argv += ["--api-key", KEY, "--data", str(candles), "--order-limit", "2"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MELTICA_EMULATOR_API_SECRET": SECRET}
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, f"emulator not listening after 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        rest = ccxt.binance({**ccxt_config_for(f"http://127.0.0.1:{port}"), "apiKey": KEY, "secret": SECRET})
        server_time = rest.fetch_time()
        assert server_time is not None and abs(server_time - wall_ms()) < 5_000
        klines = rest.fetch_ohlcv("BTC/USDT", "1m", limit=5)
        assert 0 <= server_time - klines[0][0] < MINUTE_MS + 5_000  # the data starts now, not in 2022
        assert Decimal(str(klines[0][1])) == FIRST_BAR[0]
        assert int(rest.last_response_headers["X-MBX-USED-WEIGHT-1M"]) > 0
        for _ in range(2):
            rest.create_order("BTC/USDT", "limit", "buy", 0.001, 30_000)
        with pytest.raises(ccxt.BaseError, match="-1015"):  # --order-limit 2
            rest.create_order("BTC/USDT", "limit", "buy", 0.001, 30_000)
        assert "real time x1" in log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_help_documents_every_flag() -> None:
    from typer.testing import CliRunner

    from meltica.cli import app

    result = CliRunner().invoke(app, ["emulator", "binance", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flags = ["--port", "--host", "--allow-remote", "--api-key", "--api-secret-file", "--accounts-file", "--balance"]
    flags += ["--admin-token-file", "--write-admin-token", "--data", "--symbols"]
    flags += ["--data-symbol", "--timeframe", "--realtime", "--data-time", "--speed", "--history-bars", "--price"]
    flags += ["--maker-fee", "--data-volume", "--depth-from-volume", "--deep-book"]
    flags += ["--taker-fee", "--weight-limit", "--weight-interval", "--order-limit", "--order-interval"]
    flags += ["--daily-order-limit", "--ban-after", "--ban-seconds", "--limits", "--no-limits", "--ticker-interval"]
    for flag in flags:
        assert flag in result.output, flag


def test_emulator_thread_serves_synchronous_clients(candles: Path) -> None:
    with EmulatorThread(realtime(candles)) as emu:
        rest = ccxt.binance(ccxt_config(emu, KEY, SECRET))
        order = rest.create_order("BTC/USDT", "market", "sell", 0.01)
        assert order["status"] == "closed" and abs(order["timestamp"] - wall_ms()) < 5_000
        assert emu.call(emu.server.step(0)) == 0


def test_history_bars_are_closed_klines_before_now(candles: Path) -> None:
    rows = [line.split(",") for line in candles.read_text().splitlines()[1:6]]
    recorded = [tuple(Decimal(v) for v in row[1:6]) for row in rows]

    async def body() -> None:
        started = wall_ms()
        async with EmulatorServer(realtime(candles, history_bars=5)) as emu:
            rest = ccxt_async.binance(ccxt_config(emu))
            try:
                klines = await rest.fetch_ohlcv("BTC/USDT", "1m", limit=10)
                now = wall_ms()
                assert len(klines) >= 6
                opened = klines[5][0]  # the first bar after the history opened at the start, floored
                assert started // MINUTE_MS * MINUTE_MS <= opened <= now // MINUTE_MS * MINUTE_MS
                assert [k[0] for k in klines[:6]] == [opened - (5 - i) * MINUTE_MS for i in range(6)]
                assert [tuple(Decimal(str(v)) for v in k[1:6]) for k in klines[:5]] == recorded
            finally:
                await rest.close()

    run(body)


TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"


def test_recorded_trades_in_real_time_close_their_klines() -> None:
    """Trade data (46 s of it) starts at now; at speed 10 the minute it falls in ends about 6 s later and its
    kline is sent final (``x: true``) though no later trade comes. (At speed 60 the minute ended about a
    second after the start: a stream subscribed later than that on a loaded machine missed the final kline.)"""

    async def body() -> None:
        async with EmulatorServer(realtime(TRADES, speed=10, ticker_interval_s=0.1)) as emu:
            raw: list[dict[str, Any]] = []
            reader = asyncio.create_task(read_stream(emu, ["btcusdt@kline_1m"], raw))
            try:

                def final() -> list[dict[str, Any]]:
                    return [m["data"]["k"] for m in raw if m["data"]["k"]["x"]]

                await wait_for(lambda: sum(k["n"] for k in final()) >= 2001, timeout=30)  # the file's trades
                assert sum(k["n"] for k in final()) == 2001
                assert len({k["t"] for k in final()}) == len(final())  # one final event per kline
                first = final()[0]
                assert abs(first["t"] - wall_ms()) < 10 * MINUTE_MS and Decimal(first["o"]) == Decimal("39432.48")
            finally:
                reader.cancel()

    run(body, timeout=60)
