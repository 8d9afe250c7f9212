"""Matching engine driven by recorded market data: trades, bars, book updates, the synthetic book."""

from __future__ import annotations

from decimal import Decimal as D

from meltica.domain import Side
from meltica.matching import EngineOrderStatus, EngineOrderType, FeeSchedule, FillModel, MatchingEngine, NewOrder
from tests.kit import ManualClock
from tests.unit.test_matching_core import BUY, MARKET, SELL, SYM, limit, make_engine


def test_resting_limit_fills_only_on_trades_through_its_price() -> None:
    e = make_engine(maker="0.001", taker="0")
    order = e.submit(limit("alice", BUY, "1", "100")).order
    assert order is not None
    assert not e.on_trade(SYM, D(100), D(5)).fills  # at the price: queue position unknown
    assert not e.on_trade(SYM, D("99.99"), D(5), taker_side=Side.BUY).fills  # a buyer took: no seller for us
    res = e.on_trade(SYM, D("99.99"), D("0.3"), taker_side=Side.SELL)
    assert [(f.price, f.quantity, f.is_maker, f.commission) for f in res.fills] == [
        (D(100), D("0.3"), True, D("0.0003"))
    ]
    res = e.on_trade(SYM, D("99.5"), D(5))
    assert sum(f.quantity for f in res.fills) == D("0.7")
    assert e.get_order("alice", SYM, order.order_id).status is EngineOrderStatus.FILLED
    assert e.last_price(SYM) == D("99.5")


def test_fill_on_touch() -> None:
    e = MatchingEngine(clock=ManualClock(), fees=FeeSchedule(D(0), D(0)), fill_model=FillModel(fill_on_touch=True))
    e.add_instrument(make_engine().instrument(SYM), SYM)
    e.ledger.deposit("alice", "BTC", D(1))
    e.submit(limit("alice", SELL, "1", "100"))
    assert e.on_trade(SYM, D(100), D("0.25")).fills[0].quantity == D("0.25")


def test_trades_share_quantity_in_price_time_priority() -> None:
    e = make_engine()
    a = e.submit(limit("alice", SELL, "1", "100")).order
    b = e.submit(limit("bob", SELL, "1", "100")).order
    c = e.submit(limit("carol", SELL, "1", "99")).order
    assert a and b and c
    res = e.on_trade(SYM, D(101), D("1.5"))
    assert [(f.order_id, f.quantity) for f in res.fills] == [(c.order_id, D(1)), (a.order_id, D("0.5"))]


def test_synthetic_book_from_last_price() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_trade(SYM, D(100), D(1))
    view = e.book(SYM, depth=2)
    # level i sits 10 bps × (i + ½) away: 5 and 15 bps
    assert view.bids == ((D("99.95"), D(1_000_000)), (D("99.85"), D(1_000_000)))
    assert view.asks == ((D("100.05"), D(1_000_000)), (D("100.15"), D(1_000_000)))
    assert len(e.book(SYM).bids) == 5
    res = e.submit(NewOrder("alice", SYM, BUY, MARKET, quantity=D(1)))
    assert res.fills[0].price == D("100.05")
    e.on_trade(SYM, D(200), D(1))
    assert e.book(SYM).asks[0] == (D("200.10"), D(1_000_000))
    e.on_book_snapshot(SYM, bids=[(D(199), D(1))], asks=[(D(201), D(2))])
    e.on_trade(SYM, D(300), D(1))  # a recorded book was seen: no synthetic levels any more
    assert e.book(SYM).asks == ((D(201), D(2)),)


def test_recorded_liquidity_arriving_through_a_resting_order_fills_it() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[(D(99), D(1))], asks=[(D(101), D(1))])
    e.submit(limit("alice", BUY, "1", "100"))
    res = e.on_book_delta(SYM, bids=[], asks=[(D("99.9"), D("0.4"))])
    assert [(f.price, f.quantity, f.is_maker) for f in res.fills] == [(D(100), D("0.4"), True)]
    view = e.book(SYM)
    assert view.asks == ((D(101), D(1)),)
    assert view.bids[0] == (D(100), D("0.6"))


def test_bar_path_is_conservative_stop_side_first() -> None:
    """Bar O=100 H=101 L=94 C=100: the high is nearer the open, so the path is 100 → 101 → 94 → 100.

    A sell stop at 97 and a buy limit at 96 both lie on the fall to 94: the stop fires at the 97 waypoint
    (synthetic bid 97 × (1 − 5 bps) = 96.9515 → 96.95) before the buy limit fills at the low.
    """
    e = make_engine(maker="0", taker="0")
    e.on_trade(SYM, D(100), D(1))
    stop = e.submit(NewOrder("alice", SYM, SELL, EngineOrderType.STOP_LOSS, quantity=D(1), stop_price=D(97))).order
    buy = e.submit(limit("alice", BUY, "1", "96")).order
    assert stop is not None and buy is not None
    res = e.on_bar(SYM, D(100), D(101), D(94), D(100), D(10))
    assert [(f.order_id, f.price, f.is_maker) for f in res.fills] == [
        (stop.order_id, D("96.95"), False),
        (buy.order_id, D(96), True),
    ]
    assert e.last_price(SYM) == D(100)


def test_bar_low_first_when_nearer_and_touch_does_not_fill() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_trade(SYM, D(100), D(1))
    buy = e.submit(limit("alice", BUY, "1", "95")).order
    sell = e.submit(limit("bob", SELL, "1", "103")).order
    assert buy and sell
    res = e.on_bar(SYM, D(100), D(110), D(95), D(100), D(10))  # low touches 95 exactly: no fill
    assert [f.order_id for f in res.fills] == [sell.order_id]
    res = e.on_bar(SYM, D(100), D(101), D("94.99"), D(100), D("0.4"))  # volume caps the fill
    assert [(f.order_id, f.quantity) for f in res.fills] == [(buy.order_id, D("0.4"))]
