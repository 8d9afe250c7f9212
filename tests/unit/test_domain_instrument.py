from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meltica.domain import Instrument, MarketType, PriceRounding, Side
from meltica.errors import DataValidationError, InvalidOrderError

RESPONSES = Path(__file__).resolve().parents[1] / "data" / "nautilus-binance-http"


def _ccxt_markets(exchange_class: str, filename: str) -> list[dict[str, Any]]:
    """Real Binance exchangeInfo, parsed offline by ccxt's own binance class."""
    path = RESPONSES / filename
    ccxt = pytest.importorskip("ccxt")
    exchange = getattr(ccxt, exchange_class)()
    # load_markets() would fetch these margin lists over the network; parse_market only reads them.
    exchange.options["crossMarginPairsData"] = []
    exchange.options["isolatedMarginPairsData"] = []
    info = json.loads(path.read_text())
    return [exchange.parse_market(symbol) for symbol in info["symbols"]]


@pytest.fixture(scope="module")
def btcusdt() -> Instrument:
    market = _ccxt_markets("binance", "http_spot_market_exchange_info.json")[0]
    return Instrument.from_ccxt_market("binance", market)


def test_from_real_ccxt_spot_market(btcusdt: Instrument) -> None:
    assert btcusdt.symbol == "BTC/USDT"
    assert (btcusdt.base, btcusdt.quote, btcusdt.market_type) == ("BTC", "USDT", MarketType.SPOT)
    # exchangeInfo: tickSize 0.01, stepSize 0.00001, minQty 0.00001, maxQty 9000, minNotional 10
    assert btcusdt.tick_size == Decimal("0.01")
    assert btcusdt.step_size == Decimal("0.00001")
    assert btcusdt.min_quantity == Decimal("0.00001")
    assert btcusdt.max_quantity == Decimal(9000)
    assert btcusdt.min_price == Decimal("0.01")
    assert btcusdt.max_price == Decimal(1_000_000)
    assert btcusdt.min_notional == Decimal(10)
    assert btcusdt.taker_fee == Decimal("0.001")
    assert btcusdt.key == "binance:BTC/USDT"


def test_from_real_ccxt_usdm_swap_market() -> None:
    market = _ccxt_markets("binanceusdm", "http_futures_market_exchange_info.json")[0]
    swap = Instrument.from_ccxt_market("binanceusdm", market)
    assert swap.symbol == "BTC/USDT:USDT"
    assert swap.market_type is MarketType.SWAP
    assert swap.settle == "USDT"
    assert swap.tick_size == Decimal("0.1")
    assert swap.step_size == Decimal("0.001")


def test_from_ccxt_decimal_places_mode_and_bad_market() -> None:
    market = {
        "symbol": "ETH/BTC",
        "base": "ETH",
        "quote": "BTC",
        "type": "spot",
        "precision": {"price": 6, "amount": 3},
    }
    inst = Instrument.from_ccxt_market("kraken", market, precision_mode=2)
    assert inst.tick_size == Decimal("0.000001")
    assert inst.step_size == Decimal("0.001")
    with pytest.raises(DataValidationError, match=r"precision\.amount is missing"):
        Instrument.from_ccxt_market("x", {"symbol": "A/B", "base": "A", "quote": "B", "precision": {"price": 0.1}})


def test_round_price_modes(btcusdt: Instrument) -> None:
    assert btcusdt.round_price("100.005") == Decimal("100.00")  # half-even
    assert btcusdt.round_price("100.015") == Decimal("100.02")
    assert btcusdt.round_price("100.019", side=Side.BUY) == Decimal("100.01")  # passive: never pay more
    assert btcusdt.round_price("100.011", side=Side.SELL) == Decimal("100.02")  # passive: never sell lower
    assert btcusdt.round_price("100.011", side=Side.SELL, mode=PriceRounding.DOWN) == Decimal("100.01")
    assert btcusdt.round_quantity("0.123456789") == Decimal("0.12345")


def test_non_decimal_tick_grid() -> None:
    inst = Instrument(exchange="x", symbol="A/B", base="A", quote="B", tick_size="0.5", step_size="0.3")
    assert inst.round_price("10.7") == Decimal("10.5")
    assert inst.round_price("10.7", mode=PriceRounding.UP) == Decimal("11")
    assert inst.round_quantity("1") == Decimal("0.9")


@given(
    q=st.decimals(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False, places=10),
    step=st.sampled_from(["1", "0.1", "0.001", "0.00001", "0.3", "5", "0.025"]),
)
def test_round_quantity_floors_to_a_step_multiple(q: Decimal, step: str) -> None:
    inst = Instrument(exchange="x", symbol="A/B", base="A", quote="B", tick_size="0.01", step_size=step)
    rounded = inst.round_quantity(q)
    assert rounded <= q
    assert rounded % Decimal(step) == 0
    assert q - rounded < Decimal(step)


@given(
    p=st.decimals(min_value="0.01", max_value=10**6, allow_nan=False, allow_infinity=False, places=8),
    tick=st.sampled_from(["0.01", "0.1", "0.5", "1", "0.0001"]),
)
def test_round_price_stays_on_grid_and_within_one_tick(p: Decimal, tick: str) -> None:
    inst = Instrument(exchange="x", symbol="A/B", base="A", quote="B", tick_size=tick, step_size="1")
    for side in Side:
        rounded = inst.round_price(p, side=side)
        assert rounded % Decimal(tick) == 0
        assert abs(rounded - p) < Decimal(tick)
        assert (rounded <= p) if side is Side.BUY else (rounded >= p)


@pytest.mark.parametrize(
    ("price", "qty", "limit"),
    [
        ("100", "0", "quantity"),
        ("100", "0.000011", "step_size"),
        ("100", "0.000001", "step_size"),
        ("100", "9001", "max_quantity"),
        ("100.001", "1", "tick_size"),
        ("2000000", "1", "max_price"),
        ("100", "0.05", "min_notional"),
    ],
)
def test_validate_order_names_the_limit(btcusdt: Instrument, price: str, qty: str, limit: str) -> None:
    with pytest.raises(InvalidOrderError, match=limit) as info:
        btcusdt.validate_order(price, qty)
    assert info.value.details["limit"] == limit
    assert "binance:BTC/USDT" in str(info.value)


def test_validate_order_accepts_a_good_order_and_the_boundary_is_exact(btcusdt: Instrument) -> None:
    btcusdt.validate_order("30000.01", "0.001")  # raises InvalidOrderError if refused
    btcusdt.validate_order(None, "0.00001")  # market order without a reference price
    btcusdt.validate_order("10000", "0.001")  # notional exactly min_notional 10: accepted
    with pytest.raises(InvalidOrderError, match="below min_notional") as info:
        btcusdt.validate_order("10000", "0.00099")  # one step less: refused
    assert info.value.details["limit"] == "min_notional"


def test_min_quantity_checked() -> None:
    inst = Instrument(
        exchange="x", symbol="A/B", base="A", quote="B", tick_size="0.01", step_size="0.001", min_quantity="0.01"
    )
    with pytest.raises(InvalidOrderError, match="below min_quantity"):
        inst.validate_order("1", "0.005")
