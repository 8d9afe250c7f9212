"""The emulator against real Binance spot answers (``tests/data/nautilus-binance-*``, recorded from the
exchange): the same decimal notation, error codes, counts and endpoints — and ccxt's own ``binance``
class still parses every answer.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt.async_support as ccxt_async
import pytest

from meltica.emulator import EmulatorConfig, EmulatorServer, ccxt_config

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data"
TRADES = DATA / "binance" / "btcusdt-trades.parquet"
REAL = DATA / "nautilus-binance-http"
KEY, SECRET = "parity-key", "parity-secret"
EIGHT_DECIMALS = re.compile(r"^-?\d+\.\d{8}$")


def run(body: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=timeout))


def config(**kwargs: Any) -> EmulatorConfig:
    kwargs.setdefault("default_balances", {"USDT": Decimal(10_000), "BTC": Decimal(1)})
    return EmulatorConfig.single(KEY, SECRET, **kwargs)


def real(name: str) -> Any:
    return json.loads((REAL / name).read_text())


def decimal_fields(value: Any, path: str = "") -> dict[str, str]:
    """Every string that is a number, by its place in the answer (list positions generalised to ``*``)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out |= decimal_fields(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            # rows of a table (klines, depth levels): keep the column; a list of objects: one shape
            inner = f"{path}[{index}]" if all(not isinstance(v, (dict, list)) for v in value) else f"{path}[*]"
            out |= decimal_fields(item, inner)
    elif isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value):
        out[path] = value
    return out


def assert_like_binance(ours: Any, theirs: Any) -> None:
    """Where the real answer writes a number with 8 decimals, so do we (at the same place)."""
    ours_fields = decimal_fields(ours)
    theirs_fields = decimal_fields(theirs)
    shaped = {path for path, text in theirs_fields.items() if EIGHT_DECIMALS.match(text)}
    assert shaped, "the real sample has 8-decimal fields"
    common = shaped & set(ours_fields)
    assert common, (sorted(shaped), sorted(ours_fields))
    wrong = {path: ours_fields[path] for path in common if not EIGHT_DECIMALS.match(ours_fields[path])}
    assert not wrong, wrong


def test_market_data_decimals_are_binance_fixed_eight_and_ccxt_parses_them() -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[TRADES])) as emu:
            await emu.step(40)
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                async with aiohttp.ClientSession(emu.rest_url) as http:

                    async def get(path: str, **params: Any) -> Any:
                        async with http.get(path, params=params) as resp:
                            assert resp.status == 200, await resp.text()
                            return await resp.json()

                    depth = await get("/api/v3/depth", symbol="BTCUSDT", limit=5)
                    trades = await get("/api/v3/trades", symbol="BTCUSDT", limit=5)
                    agg = await get("/api/v3/aggTrades", symbol="BTCUSDT", limit=5)
                    klines = await get("/api/v3/klines", symbol="BTCUSDT", interval="1m", limit=2)
                    ticker = await get("/api/v3/ticker/24hr", symbol="BTCUSDT")
                # the recorded trades have 3-6 decimals ("0.001"); Binance always writes 8
                assert_like_binance(depth, real("http_spot_market_depth.json"))
                assert_like_binance(trades[:1], real("http_spot_market_trades.json")[:1])
                assert_like_binance(agg[:1], real("http_spot_market_agg_trades.json")[:1])
                assert_like_binance(klines[:1], real("http_spot_market_klines.json")[:1])
                for name in ("lastPrice", "lastQty", "bidQty", "askQty", "volume", "quoteVolume"):
                    assert EIGHT_DECIMALS.match(ticker[name]), (name, ticker[name])

                # ccxt reads the same numbers
                await rest.load_markets()
                book = await rest.fetch_order_book("BTC/USDT", 5)
                assert [Decimal(str(p)) for p, _ in book["bids"]] == [Decimal(p) for p, _ in depth["bids"]]
                public = await rest.fetch_trades("BTC/USDT", limit=5)
                assert [Decimal(str(t["amount"])) for t in public] == [Decimal(t["qty"]) for t in trades]
                ohlcv = await rest.fetch_ohlcv("BTC/USDT", "1m", limit=2)
                assert [Decimal(str(row[5])) for row in ohlcv] == [Decimal(k[5]) for k in klines]
                order = await rest.create_order("BTC/USDT", "market", "buy", 0.001)
                assert order["filled"] == 0.001
                assert EIGHT_DECIMALS.match(order["info"]["executedQty"])
                assert all(EIGHT_DECIMALS.match(f["qty"]) for f in order["info"]["fills"])
                balance = await rest.fetch_balance()
                assert 1 < balance["BTC"]["free"] <= 1.001  # less the fee, in BTC
                assert all(EIGHT_DECIMALS.match(b["free"]) for b in balance["info"]["balances"])
            finally:
                await rest.close()

    run(body)


def test_trade_stream_decimals_are_binance_fixed_eight() -> None:
    recorded = json.loads((DATA / "nautilus-binance-ws" / "ws_spot_trade.json").read_text())

    async def body() -> None:
        async with EmulatorServer(config(data=[TRADES])) as emu:
            sink: list[dict[str, Any]] = []
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(f"{emu.ws_url}/stream?streams=btcusdt@trade") as ws,
            ):
                deadline = asyncio.get_running_loop().time() + 5
                while not emu.hub.has_subscribers("btcusdt@trade"):
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.02)
                await emu.step(3)
                sink.append(json.loads((await ws.receive(timeout=5)).data))
            assert sink[0]["stream"] == recorded["stream"].replace("eth", "btc")
            assert_like_binance(sink[0]["data"], recorded["data"])

    run(body)


def binance_error(exc: Exception) -> dict[str, Any]:
    """The JSON body ccxt puts at the end of its exception message."""
    text = str(exc)
    body: dict[str, Any] = json.loads(text[text.index("{") :])
    return body


ORDER = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.1", "price": "100"}
ERRORS = [
    # (changed parameters, code, message) — codes and messages of binance-docs errors.md
    (
        {"quantity": "-1"},
        -1100,
        "Illegal characters found in parameter 'quantity'; legal range is '^([0-9]{1,20})(\\.[0-9]{1,20})?$'.",
    ),
    (
        {"price": "1e3"},
        -1100,
        "Illegal characters found in parameter 'price'; legal range is '^([0-9]{1,20})(\\.[0-9]{1,20})?$'.",
    ),
    ({"quantity": "0.123456789"}, -1111, "Parameter 'quantity' has too much precision."),
    ({"price": "100.000000001"}, -1111, "Parameter 'price' has too much precision."),
    ({"icebergQty": "0.2"}, -2010, "IcebergQty exceeds QTY."),
    ({"icebergQty": "0.1"}, -2010, "IcebergQty exceeds QTY."),
    (
        {"type": "MARKET", "timeInForce": None, "price": None},
        -2010,
        "Order book liquidity is less than symbol minimum quantity.",
    ),
    (
        {"type": "MARKET", "timeInForce": None, "price": None, "quantity": None, "quoteOrderQty": "100"},
        -2010,
        "Order book liquidity is less than symbol minimum quantity.",
    ),
]


def test_order_errors_are_binance_codes_and_messages() -> None:
    async def body() -> None:
        async with EmulatorServer(config()) as emu:  # no data, no price: an empty book
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await rest.load_markets()
                for changes, code, msg in ERRORS:
                    params = {k: v for k, v in (ORDER | changes).items() if v is not None}
                    with pytest.raises(ccxt_async.BaseError) as caught:
                        await rest.private_post_order(params)
                    assert binance_error(caught.value) == {"code": code, "msg": msg}, changes
                    # ccxt maps the code as against the real venue
                    assert isinstance(caught.value, (ccxt_async.BadRequest, ccxt_async.InvalidOrder)), changes
                assert await rest.fetch_open_orders("BTC/USDT") == []  # nothing was placed
                # a plain limit order is still accepted (the checks refuse only what Binance refuses)
                ok = await rest.private_post_order(dict(ORDER, quantity="0.10000000000"))
                assert ok["status"] == "NEW" and ok["origQty"] == "0.10000000"
            finally:
                await rest.close()

    run(body)


@pytest.fixture(scope="module")
def candles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped month's first 20 one-minute bars."""
    month = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
    path = tmp_path_factory.mktemp("parity") / "btc-1m.csv"
    with gzip.open(month, "rt") as source:
        path.write_text("".join(line for _, line in zip(range(21), source, strict=False)))
    return path


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_ticker_count_is_the_trades_in_the_window(candles: Path) -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[candles])) as emu:  # data time: each bar replayed whole
            await emu.step(10)
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                ticker = (await rest.fetch_ticker("BTC/USDT"))["info"]
                klines = await rest.public_get_klines({"symbol": "BTCUSDT", "interval": "1m", "limit": 100})
                trades = await rest.public_get_trades({"symbol": "BTCUSDT", "limit": 1000})
            finally:
                await rest.close()
            # Binance: count = lastId - firstId + 1, the trades the klines of the window counted
            assert ticker["count"] == sum(k[8] for k in klines) == len(trades) == 40  # 10 bars, 4 prints each
            assert ticker["count"] == ticker["lastId"] - ticker["firstId"] + 1
            assert {int(t["id"]) for t in trades} == set(range(ticker["firstId"], ticker["lastId"] + 1))
            # the prints rebuild each bar: same OHLC, the volume to the last decimal
            first = next(iter(klines))
            with gzip.open(
                Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz",
                "rt",
            ) as source:
                row = source.readlines()[1].strip().split(",")
            assert [Decimal(v) for v in first[1:6]] == [Decimal(v) for v in row[1:6]]

    run(body)


async def kline_events(emu: EmulatorServer, sink: list[dict[str, Any]], ready: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{emu.ws_url}/ws/btcusdt@kline_1m") as ws:
        ready.set()
        async for msg in ws:
            sink.append(json.loads(msg.data)["k"])


def check_forming_then_final(events: list[dict[str, Any]], rest_rows: dict[int, list[Any]]) -> int:
    """Every kline is streamed forming (``x: false``) before its final event (``x: true``), which equals
    the REST kline; returns how many klines closed."""
    by_open: dict[int, list[dict[str, Any]]] = {}
    for k in events:
        by_open.setdefault(k["t"], []).append(k)
    closed = 0
    for open_ms, updates in by_open.items():
        flags = [k["x"] for k in updates]
        if True not in flags:
            continue
        closed += 1
        assert flags.index(True) > 0 and not any(flags[: flags.index(True)]), (open_ms, flags)
        assert flags.count(True) == 1, (open_ms, flags)
        final = updates[flags.index(True)]
        row = rest_rows[open_ms]
        assert [final[f] for f in ("o", "h", "l", "c", "v")] == row[1:6]
        assert final["n"] == row[8] == 4
        forming = updates[0]
        assert Decimal(forming["v"]) < Decimal(final["v"]) and forming["o"] == final["o"]
    return closed


def test_klines_stream_while_open_then_closed_in_data_time(candles: Path) -> None:
    async def body() -> None:
        async with EmulatorServer(config(data=[candles])) as emu:
            events: list[dict[str, Any]] = []
            ready = asyncio.Event()
            reader = asyncio.create_task(kline_events(emu, events, ready))
            try:
                await ready.wait()
                await wait_for(lambda: emu.hub.has_subscribers("btcusdt@kline_1m"))
                await emu.step(5)
                await wait_for(lambda: sum(k["x"] for k in events) >= 5)
                async with aiohttp.ClientSession(emu.rest_url) as http:
                    params = {"symbol": "BTCUSDT", "interval": "1m"}
                    async with http.get("/api/v3/klines", params=params) as resp:
                        rows = {row[0]: row for row in await resp.json()}
                assert check_forming_then_final(events, rows) == 5
            finally:
                reader.cancel()

    run(body)


def test_klines_stream_while_open_then_closed_when_driven() -> None:
    async def body() -> None:
        async with EmulatorServer(config(initial_prices={"BTCUSDT": Decimal(46_000)})) as emu:
            events: list[dict[str, Any]] = []
            ready = asyncio.Event()
            reader = asyncio.create_task(kline_events(emu, events, ready))
            try:
                await ready.wait()
                await wait_for(lambda: emu.hub.has_subscribers("btcusdt@kline_1m"))
                async with aiohttp.ClientSession(emu.rest_url, headers=emu.admin_headers()) as http:
                    start = 1_700_000_040_000
                    for n in range(3):
                        open_ms = start + n * 60_000
                        bar = {"symbol": "BTCUSDT", "open_time_ms": open_ms, "close_time_ms": open_ms + 60_000}
                        bar |= {"open": "46000", "high": "46100", "low": "45900", "close": "46050", "volume": "2.5"}
                        async with http.post("/_emulator/market/bar", json=bar) as resp:
                            assert resp.status == 200, await resp.text()
                    await wait_for(lambda: sum(k["x"] for k in events) >= 3)
                    params = {"symbol": "BTCUSDT", "interval": "1m"}
                    async with http.get("/api/v3/klines", params=params) as resp:
                        rows = {row[0]: row for row in await resp.json()}
                assert check_forming_then_final(events, rows) == 3
                assert rows[start][5] == "2.50000000"
            finally:
                reader.cancel()

    run(body)


def test_trade_fee_endpoint_answers_as_binance_and_ccxt_reads_it() -> None:
    recorded = real("http_wallet_trading_fees.json")

    async def body() -> None:
        async with EmulatorServer(config(symbols=["BTCUSDT", "ETHUSDT"])) as emu:
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await rest.load_markets()
                rows = await rest.sapi_get_asset_tradefee()
                assert rows == recorded  # Binance's default rates, written as Binance writes them
                one = await rest.sapi_get_asset_tradefee({"symbol": "ETHUSDT"})
                assert one == [recorded[1]]
                fees = await rest.fetch_trading_fees()  # ccxt's spot path: /sapi/v1/asset/tradeFee
                assert fees["BTC/USDT"]["maker"] == 0.001 and fees["ETH/USDT"]["taker"] == 0.001
            finally:
                await rest.close()

    run(body)


async def self_cross(mode: str | None) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """A resting sell of our own on an empty book, then our buy crossing it under ``mode``: (maker, taker,
    fills)."""
    async with EmulatorServer(config()) as emu:
        rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
        try:
            await rest.load_markets()
            sell = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC"}
            maker = await rest.private_post_order(sell | {"quantity": "0.1", "price": "99.00"})
            buy = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC"}
            buy |= {"quantity": "0.1", "price": "99.00", "newOrderRespType": "FULL"}
            if mode is not None:
                buy["selfTradePreventionMode"] = mode
            taker = await rest.private_post_order(buy)
            maker_now = await rest.private_get_order({"symbol": "BTCUSDT", "orderId": maker["orderId"]})
            return maker_now, taker, await rest.private_get_mytrades({"symbol": "BTCUSDT"})
        finally:
            await rest.close()


@pytest.mark.parametrize(
    ("mode", "maker_status", "taker_status"),
    [
        (None, "FILLED", "FILLED"),  # the default, NONE: they trade
        ("NONE", "FILLED", "FILLED"),
        ("EXPIRE_TAKER", "NEW", "EXPIRED_IN_MATCH"),
        ("EXPIRE_MAKER", "EXPIRED_IN_MATCH", "NEW"),
        ("EXPIRE_BOTH", "EXPIRED_IN_MATCH", "EXPIRED_IN_MATCH"),
    ],
)
def test_self_trade_prevention_modes_are_honoured(mode: str | None, maker_status: str, taker_status: str) -> None:
    async def body() -> None:
        maker, taker, trades = await self_cross(mode)
        assert (maker["status"], taker["status"]) == (maker_status, taker_status)
        assert taker["selfTradePreventionMode"] == (mode or "NONE")
        assert bool(trades) is (maker_status == "FILLED")

    run(body)


def test_an_unknown_self_trade_prevention_mode_is_refused() -> None:
    async def body() -> None:
        async with EmulatorServer(config(initial_prices={"BTCUSDT": Decimal(100)})) as emu:
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await rest.load_markets()
                with pytest.raises(ccxt_async.BadRequest) as caught:
                    await rest.private_post_order(ORDER | {"selfTradePreventionMode": "EXPIRE_SOMETIMES"})
                assert binance_error(caught.value) == {
                    "code": -1130,
                    "msg": "Data sent for parameter 'selfTradePreventionMode' is not valid.",
                }
                info = await rest.public_get_exchangeinfo({"symbol": "BTCUSDT"})
                (symbol,) = info["symbols"]
                assert symbol["defaultSelfTradePreventionMode"] == "NONE"
                assert set(symbol["allowedSelfTradePreventionModes"]) == {
                    "NONE",
                    "EXPIRE_TAKER",
                    "EXPIRE_MAKER",
                    "EXPIRE_BOTH",
                }
            finally:
                await rest.close()

    run(body)


def first_rows(path: Path, n: int) -> list[list[str]]:
    with path.open() as source:
        return [line.strip().split(",") for line in source.readlines()[1 : n + 1]]


def test_quote_volume_data_is_served_as_base_volume(candles: Path) -> None:
    """The shipped file's volume column is USDT (its README): with ``data_volume="quote"`` the klines count
    BTC, and their quote volume gives the recorded number back."""
    (row,) = first_rows(candles, 1)
    o, h, lo, c, quote = (Decimal(v) for v in row[1:6])

    async def body() -> None:
        async with EmulatorServer(config(data=[candles], data_volume="quote")) as emu:
            await emu.step(3)
            async with (
                aiohttp.ClientSession(emu.rest_url) as http,
                http.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m"}) as resp,
            ):
                first = (await resp.json())[0]
        base = Decimal(first[5])
        assert base == (quote / ((o + h + lo + c) / 4)).quantize(Decimal("0.00000001"))
        assert 40 < base < 60  # BTC traded in that minute (2,300,413 USDT at ~46,350), not 2.3 million
        assert abs(Decimal(first[7]) - quote) < Decimal("0.01")  # the kline's quote volume: as recorded

    run(body)


def test_replayed_bars_size_the_book_and_large_orders_walk_it(candles: Path) -> None:
    rows = first_rows(candles, 3)

    async def depth_and_fill(**kwargs: Any) -> tuple[list[list[str]], dict[str, Any]]:
        balances = {"USDT": Decimal(10_000_000), "BTC": Decimal(0)}
        async with EmulatorServer(
            config(data=[candles], data_volume="quote", default_balances=balances, **kwargs)
        ) as emu:
            await emu.step(3)
            rest = ccxt_async.binance(ccxt_config(emu, KEY, SECRET))
            try:
                await rest.load_markets()
                book = await rest.public_get_depth({"symbol": "BTCUSDT", "limit": 5})
                order = await rest.create_order("BTC/USDT", "market", "buy", 100)  # two minutes' trading
                return book["asks"], order["info"]
            finally:
                await rest.close()

    async def body() -> None:
        o, h, lo, c, quote = (Decimal(v) for v in rows[2][1:6])
        bar_volume = (quote / ((o + h + lo + c) / 4)).quantize(Decimal("0.00000001"))
        asks, order = await depth_and_fill()
        # each of the 5 levels: a fifth of the last bar's volume, in whole lots (0.00001 BTC)
        level = (bar_volume / 5 // Decimal("0.00001")) * Decimal("0.00001")
        assert [Decimal(q) for _, q in asks] == [level] * 5
        # 100 BTC is more than the book: it takes every level, at rising prices, and the rest expires
        prices = [Decimal(f["price"]) for f in order["fills"]]
        assert len(prices) == 5 and prices == sorted(prices) and prices[0] < prices[-1]
        assert order["status"] == "EXPIRED" and Decimal(order["executedQty"]) == 5 * level

        deep_asks, deep_order = await depth_and_fill(depth_from_volume=False)  # the old book, on demand
        assert {Decimal(q) for _, q in deep_asks} == {Decimal(1_000_000)}
        assert deep_order["status"] == "FILLED" and len({f["price"] for f in deep_order["fills"]}) == 1

    run(body)
