"""Intent → ccxt create_order arguments, checked against the request ccxt's own binance class builds."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import ccxt
import ccxt.pro as ccxt_pro
import pytest

from meltica.adapters.ccxt import BINANCE, GENERIC, build_order_request
from meltica.adapters.ccxt.parsing import capabilities_from, parse_order
from meltica.domain import Instrument, OrderIntent, OrderStatus, OrderType, Side, TimeInForce, client_order_id_for
from meltica.errors import InvalidOrderError

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORDER_TYPES = ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT", "TAKE_PROFIT_LIMIT"]


def _binance() -> Any:
    exchange = ccxt.binance({"apiKey": "k", "secret": "s"})
    exchange.set_markets(
        [
            {
                "id": "BTCUSDT",
                "symbol": "BTC/USDT",
                "base": "BTC",
                "quote": "USDT",
                "baseId": "BTC",
                "quoteId": "USDT",
                "type": "spot",
                "spot": True,
                "margin": False,
                "swap": False,
                "future": False,
                "option": False,
                "contract": False,
                "linear": None,
                "inverse": None,
                "active": True,
                "precision": {"price": 0.01, "amount": 0.00001},
                "limits": {"amount": {"min": 0.00001, "max": 9000}, "price": {"min": 0.01}, "cost": {"min": 5}},
                "info": {"orderTypes": ORDER_TYPES},
            }
        ]
    )
    return exchange


EXCHANGE = _binance()
INSTRUMENT = Instrument.from_ccxt_market("binance", EXCHANGE.markets["BTC/USDT"])
CAPS = capabilities_from(ccxt_pro.binance().has, BINANCE)  # the adapter uses the pro class


def intent(**kwargs: Any) -> OrderIntent:
    base: dict[str, Any] = {
        "intent_id": "i-1",
        "account": "main",
        "strategy": "s",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "quantity": Decimal("0.0123456"),
        "price": Decimal("30000.017"),
        "created_at": T0,
    }
    base.update(kwargs)
    return OrderIntent(**base)


def binance_request(order: OrderIntent) -> dict[str, Any]:
    req = build_order_request(order, INSTRUMENT, order.client_order_id, BINANCE, CAPS)
    symbol, type_, side, amount, price, params = req.ccxt_args()
    result: dict[str, Any] = EXCHANGE.create_order_request(symbol, type_, side, amount, price, params)
    return result


def test_limit_rounded_with_client_id_and_tif() -> None:
    order = intent()
    req = build_order_request(order, INSTRUMENT, order.client_order_id, BINANCE, CAPS)
    assert req.amount == Decimal("0.01234")  # floored to the step
    assert req.price == Decimal("30000.01")  # a buy rounds down (passive)
    sent = binance_request(order)
    assert sent["type"] == "LIMIT"
    assert sent["newClientOrderId"] == client_order_id_for("i-1")
    assert sent["timeInForce"] == "GTC"
    assert sent["quantity"] == "0.01234"
    assert sent["price"] == "30000.01"


def test_sell_limit_rounds_up() -> None:
    req = build_order_request(intent(side=Side.SELL), INSTRUMENT, "cid-1", BINANCE, CAPS)
    assert req.price == Decimal("30000.02")


def test_market() -> None:
    sent = binance_request(intent(type=OrderType.MARKET, price=None))
    assert sent["type"] == "MARKET"
    assert sent["quantity"] == "0.01234"
    assert "price" not in sent


def test_post_only_is_limit_maker() -> None:
    sent = binance_request(intent(post_only=True))
    assert sent["type"] == "LIMIT_MAKER"
    assert "timeInForce" not in sent


def test_ioc() -> None:
    assert binance_request(intent(time_in_force=TimeInForce.IOC))["timeInForce"] == "IOC"


def test_stop_limit_is_stop_loss_limit_with_stop_price() -> None:
    sent = binance_request(
        intent(side=Side.SELL, type=OrderType.STOP_LIMIT, price=Decimal(29000), trigger_price=Decimal(29500))
    )
    assert sent["type"] == "STOP_LOSS_LIMIT"
    assert sent["stopPrice"] == "29500"
    assert sent["price"] == "29000"


def test_stop_market_is_stop_loss() -> None:
    sent = binance_request(intent(side=Side.SELL, type=OrderType.STOP_MARKET, price=None, trigger_price=Decimal(29500)))
    assert sent["type"] == "STOP_LOSS"
    assert sent["stopPrice"] == "29500"


def test_take_profit_limit() -> None:
    sent = binance_request(
        intent(side=Side.SELL, type=OrderType.TAKE_PROFIT_LIMIT, price=Decimal(31000), trigger_price=Decimal(30900))
    )
    assert sent["type"] == "TAKE_PROFIT_LIMIT"
    assert sent["stopPrice"] == "30900"


def test_take_profit_market() -> None:
    sent = binance_request(intent(side=Side.SELL, type=OrderType.TAKE_PROFIT, price=None, trigger_price=Decimal(31000)))
    assert sent["type"] == "TAKE_PROFIT"


def test_iceberg_passes_icebergqty() -> None:
    sent = binance_request(intent(display_quantity=Decimal("0.002")))
    assert sent["icebergQty"] == "0.002"
    assert sent["type"] == "LIMIT"


def test_trailing_percent_is_trailing_delta_in_bips() -> None:
    sent = binance_request(
        intent(side=Side.SELL, type=OrderType.TRAILING_STOP, price=None, trailing_offset_pct=Decimal(1))
    )
    assert sent["type"] == "STOP_LOSS"
    assert sent["trailingDelta"] == "100"


def test_trailing_with_activation_price() -> None:
    sent = binance_request(
        intent(
            side=Side.SELL,
            type=OrderType.TRAILING_STOP,
            price=None,
            trailing_offset_pct=Decimal("0.5"),
            activation_price=Decimal(31000),
        )
    )
    assert sent["trailingDelta"] == "50"
    assert sent["stopPrice"] == "31000"


def test_unsupported_features_are_refused_before_sending() -> None:
    with pytest.raises(InvalidOrderError) as info:
        build_order_request(
            intent(type=OrderType.TRAILING_STOP, price=None, trailing_offset=Decimal(100)),
            INSTRUMENT,
            "c",
            BINANCE,
            CAPS,
        )
    assert info.value.reason == "unsupported_by_venue"
    with pytest.raises(InvalidOrderError):
        build_order_request(intent(reduce_only=True), INSTRUMENT, "c", BINANCE, CAPS)  # spot
    with pytest.raises(InvalidOrderError):
        build_order_request(intent(display_quantity=Decimal("0.002")), INSTRUMENT, "c", GENERIC, None)
    with pytest.raises(InvalidOrderError):
        build_order_request(
            intent(time_in_force=TimeInForce.GTD, expire_at=datetime(2026, 2, 1, tzinfo=UTC)),
            INSTRUMENT,
            "c",
            BINANCE,
            CAPS,
        )


def test_venue_rules_checked_after_rounding() -> None:
    with pytest.raises(InvalidOrderError) as info:
        build_order_request(intent(quantity=Decimal("0.0001")), INSTRUMENT, "c", BINANCE, CAPS)  # 3 USDT < 5
    assert info.value.details["limit"] == "min_notional"


def test_capabilities_of_binance() -> None:
    assert CAPS.supports(OrderType.TRAILING_STOP)
    assert CAPS.supports(OrderType.STOP_LIMIT)
    assert CAPS.iceberg
    assert CAPS.post_only
    assert CAPS.amend
    assert CAPS.fetch_order_by_client_id
    assert CAPS.watch_order_book


def test_parse_binance_order_response() -> None:
    raw = EXCHANGE.parse_order(
        {
            "symbol": "BTCUSDT",
            "orderId": 28,
            "clientOrderId": "mlt-abc",
            "transactTime": 1507725176595,
            "price": "30000.00",
            "origQty": "0.01000000",
            "executedQty": "0.00400000",
            "cummulativeQuoteQty": "120.0",
            "status": "PARTIALLY_FILLED",
            "timeInForce": "GTC",
            "type": "STOP_LOSS_LIMIT",
            "side": "SELL",
            "stopPrice": "29500.00",
        }
    )
    order = parse_order("binance", raw)
    assert order.status is OrderStatus.PARTIALLY_FILLED
    assert order.type is OrderType.STOP_LIMIT
    assert order.trigger_price == Decimal("29500")
    assert order.client_order_id == "mlt-abc"
    assert order.exchange_order_id == "28"
    assert order.remaining == Decimal("0.006")
