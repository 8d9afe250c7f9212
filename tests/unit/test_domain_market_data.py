from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meltica.domain import Bar, BookLevel, OrderBookDelta, OrderBookSnapshot, Trade

T0 = datetime(2024, 1, 1, tzinfo=UTC)
prices = st.decimals(min_value="0.01", max_value=10**6, places=2, allow_nan=False, allow_infinity=False)


def bar(**fields: object) -> Bar:
    data: dict[str, object] = {
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
        "ts": T0,
        "open": "10",
        "high": "12",
        "low": "9",
        "close": "11",
        "volume": "3",
    }
    data.update(fields)
    return Bar.model_validate(data)


@given(st.lists(prices, min_size=4, max_size=4), st.decimals(min_value=0, max_value=10**9, places=4))
def test_bar_accepts_exactly_consistent_ohlc(values: list[Decimal], volume: Decimal) -> None:
    o, h, l, c = values  # noqa: E741
    consistent = l <= min(o, c) and max(o, c) <= h and l <= h
    try:
        b = bar(open=o, high=h, low=l, close=c, volume=volume)
    except ValidationError:
        assert not consistent
    else:
        assert consistent
        assert b.low <= b.open <= b.high
        assert b.low <= b.close <= b.high


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"low": "13"}, "low 13 is above high 12"),
        ({"open": "12.5"}, r"open 12.5 is outside \[low 9, high 12\]"),
        ({"close": "8"}, "close 8 is outside"),
        ({"volume": "-1"}, "must be >= 0"),
        ({"timeframe": "1M"}, "invalid timeframe"),
        ({"ts": datetime(2024, 1, 1)}, "naive datetime"),  # noqa: DTZ001
        ({"open": 1.0e400}, "NaN and infinity"),
    ],
)
def test_bar_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        bar(**fields)


def test_bar_close_time_and_json_round_trip() -> None:
    b = bar(timeframe="5m")
    assert b.close_time == T0 + timedelta(minutes=5)
    assert Bar.model_validate_json(b.model_dump_json()) == b
    assert '"open":"10"' in b.model_dump_json()  # decimals travel as strings, not floats


def _levels(*pairs: tuple[str, str]) -> tuple[BookLevel, ...]:
    return tuple(BookLevel(price=p, quantity=q) for p, q in pairs)


def test_book_snapshot_ordering_and_cross() -> None:
    book = OrderBookSnapshot(
        exchange="binance",
        symbol="BTC/USDT",
        ts=T0,
        sequence=7,
        bids=_levels(("100", "1"), ("99", "2")),
        asks=_levels(("101", "1"), ("102", "3")),
    )
    assert book.mid == Decimal("100.5")
    assert book.best_bid == BookLevel(price="100", quantity="1")
    with pytest.raises(ValidationError, match="bids must be strictly descending"):
        OrderBookSnapshot(exchange="b", symbol="s", ts=T0, bids=_levels(("99", "1"), ("100", "1")))
    with pytest.raises(ValidationError, match="asks must be strictly ascending"):
        OrderBookSnapshot(exchange="b", symbol="s", ts=T0, asks=_levels(("101", "1"), ("101", "1")))
    with pytest.raises(ValidationError, match="crossed book"):
        OrderBookSnapshot(exchange="b", symbol="s", ts=T0, bids=_levels(("101", "1")), asks=_levels(("101", "1")))
    with pytest.raises(ValidationError, match="quantity 0"):
        OrderBookSnapshot(exchange="b", symbol="s", ts=T0, bids=_levels(("101", "0")))


def test_book_delta() -> None:
    delta = OrderBookDelta(
        exchange="b", symbol="s", ts=T0, first_sequence=5, last_sequence=9, bids=_levels(("100", "0"))
    )
    assert delta.bids[0].quantity == 0  # zero removes the level
    with pytest.raises(ValidationError, match="first_sequence 9 is after last_sequence 5"):
        OrderBookDelta(exchange="b", symbol="s", ts=T0, first_sequence=9, last_sequence=5)
    with pytest.raises(ValidationError, match="repeat a price level"):
        OrderBookDelta(
            exchange="b", symbol="s", ts=T0, first_sequence=1, last_sequence=1, asks=_levels(("1", "1"), ("1", "2"))
        )


def test_trade() -> None:
    trade = Trade(
        exchange="binance",
        symbol="BTC/USDT",
        trade_id="12345",
        price="0.001",
        quantity="100",
        aggressor_side="sell",
        ts=T0,
    )
    assert trade.price == Decimal("0.001")
    with pytest.raises(ValidationError):
        Trade(exchange="binance", symbol="BTC/USDT", trade_id="1", price="0", quantity="1", ts=T0)
