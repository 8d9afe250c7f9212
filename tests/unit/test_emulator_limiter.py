"""The emulator's Binance limits on their own: windows, 429 back-off, 418 bans that last and grow, order counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meltica.emulator.errors import BinanceError
from meltica.emulator.limits import RateLimiter, RateLimits, interval_label, request_weight
from meltica.emulator.replay import BarEvent, TradeEvent, bar_path, to_wall_clock

T = 1_800_000_000_000  # a window boundary for 1 s, 10 s and 60 s windows


def test_weight_window_429_then_ban_after_strikes() -> None:
    limiter = RateLimiter(RateLimits(request_weight=10, weight_interval_s=60, ban_after_429s=3, ban_s=120))
    assert limiter.admit("ip", 4, T) == {"X-MBX-USED-WEIGHT-1M": "4"}
    assert limiter.admit("ip", 6, T + 1) == {"X-MBX-USED-WEIGHT-1M": "10"}
    with pytest.raises(BinanceError) as first:
        limiter.admit("ip", 1, T + 1_000)
    assert (first.value.status, first.value.code) == (429, -1003)
    assert first.value.headers["Retry-After"] == "59"  # until the minute ends
    assert limiter.admit("other-ip", 1, T + 1_000)  # per IP
    for _ in range(2):  # still sending while told to back off: strikes
        with pytest.raises(BinanceError) as again:
            limiter.admit("ip", 1, T + 2_000)
        assert again.value.status == 429
    with pytest.raises(BinanceError) as ban:
        limiter.admit("ip", 1, T + 2_000)
    assert (ban.value.status, ban.value.code, ban.value.headers["Retry-After"]) == (418, -1003, "120")
    assert f"IP banned until {T + 2_000 + 120_000}" in ban.value.msg
    # the ban outlasts the weight window
    with pytest.raises(BinanceError) as still:
        limiter.admit("ip", 1, T + 61_000)
    assert still.value.status == 418 and still.value.headers["Retry-After"] == "61"
    assert limiter.admit("ip", 1, T + 122_000) == {"X-MBX-USED-WEIGHT-1M": "1"}
    # a second ban lasts twice as long
    limiter.admit("ip", 9, T + 122_001)
    for _ in range(4):
        with pytest.raises(BinanceError) as err:
            limiter.admit("ip", 1, T + 122_002)
    assert err.value.status == 418 and err.value.headers["Retry-After"] == "240"


def test_not_enforced_still_counts() -> None:
    limiter = RateLimiter(RateLimits(request_weight=1))
    limiter.admit("ip", 1, T)
    assert limiter.admit("ip", 5, T, enforce=False) == {"X-MBX-USED-WEIGHT-1M": "6"}
    off = RateLimiter(RateLimits(request_weight=1, enabled=False))
    assert off.admit("ip", 5, T) == {"X-MBX-USED-WEIGHT-1M": "5"}


def test_order_count_short_and_daily_windows() -> None:
    limiter = RateLimiter(RateLimits(orders=2, orders_interval_s=10, orders_per_day=3))
    assert limiter.count_order("a", T) == {"X-MBX-ORDER-COUNT-10S": "1", "X-MBX-ORDER-COUNT-1D": "1"}
    limiter.count_order("a", T + 1)
    with pytest.raises(BinanceError) as short:
        limiter.count_order("a", T + 4_000)
    assert (short.value.status, short.value.code, short.value.headers["Retry-After"]) == (429, -1015, "6")
    assert "2 orders per 10 SECOND" in short.value.msg
    assert limiter.count_order("b", T + 4_000)  # per account
    limiter.count_order("a", T + 10_000)  # a new 10 s window; the third of the day
    with pytest.raises(BinanceError) as daily:
        limiter.count_order("a", T + 20_000)
    assert daily.value.code == -1015 and "3 orders per 1 DAY" in daily.value.msg


def test_weights_and_labels_follow_the_docs() -> None:
    assert request_weight("GET", "/api/v3/exchangeInfo", {}) == 20
    assert request_weight("GET", "/api/v3/depth", {"limit": "1000"}) == 50
    assert request_weight("GET", "/api/v3/openOrders", {}) == 80
    assert request_weight("GET", "/api/v3/openOrders", {"symbol": "BTCUSDT"}) == 6
    assert request_weight("GET", "/api/v3/ticker/24hr", {"symbol": "BTCUSDT"}) == 2
    assert request_weight("GET", "/api/v3/ticker/24hr", {}) == 80
    assert request_weight("GET", "/api/v3/myTrades", {"orderId": "1"}) == 5
    assert request_weight("POST", "/api/v3/order", {}) == 1
    assert [interval_label(s) for s in (1, 10, 60, 120, 3600, 86400)] == ["1S", "10S", "1M", "2M", "1H", "1D"]
    info = RateLimits().exchange_info()
    assert info[0] == {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}
    assert info[2] == {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000}


def test_wall_clock_shift_and_bar_paths() -> None:
    from decimal import Decimal as D

    start = datetime(2022, 1, 1, tzinfo=UTC)
    bars = [
        BarEvent(
            start + timedelta(minutes=i + 1), "BTCUSDT", start + timedelta(minutes=i), D(o), D(h), D(lo), D(c), D(8), 60
        )
        for i, (o, h, lo, c) in enumerate([(10, 12, 9, 11), (11, 11, 8, 10)])
    ]
    now = datetime(2026, 12, 6, 23, 40, 17, 250_000, tzinfo=UTC)
    events = to_wall_clock(list(bars), now)
    origin = datetime(2026, 12, 6, 23, 40, tzinfo=UTC)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["PathTradeEvent"] * 4 + ["BarEvent"] + ["PathTradeEvent"] * 4 + ["BarEvent"]
    assert events[0].ts == origin and events[4].ts == origin + timedelta(minutes=1)
    path = bar_path(bars[0])
    assert [p.price for p in path] == [D(10), D(9), D(12), D(11)]  # the low is nearer the open
    assert [p.ts - start for p in path] == [
        timedelta(0),
        timedelta(seconds=20),
        timedelta(seconds=40),
        timedelta(milliseconds=59_999),
    ]
    assert sum(p.quantity for p in path) == D(8)
    assert [p.buyer_maker for p in path] == [False, True, False, True]
    trades = [
        TradeEvent(start, "BTCUSDT", 1, D(1), D(1), False),
        TradeEvent(start + timedelta(seconds=3), "BTCUSDT", 2, D(1), D(1), True),
    ]
    shifted = to_wall_clock(list(trades), now)
    assert [e.ts for e in shifted] == [now, now + timedelta(seconds=3)]  # no bars: the first trade at now
