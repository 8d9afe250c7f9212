"""Matching engine order types: LIMIT_MAKER, IOC, FOK, stops, trailing, iceberg, cancel-replace, amend, GTD."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from meltica.matching import (
    CancelReplacePartialFailureError,
    EngineOrderStatus,
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    ExecutionType,
    LedgerBalance,
    NewOrder,
    RejectReason,
    SelfTradePrevention,
)
from tests.kit import ManualClock
from tests.unit.test_matching_core import BUY, MARKET, SELL, SYM, limit, make_engine

IOC, FOK, GTD = EngineTimeInForce.IOC, EngineTimeInForce.FOK, EngineTimeInForce.GTD


def test_limit_maker_that_would_take_is_rejected() -> None:
    e = make_engine()
    e.on_book_snapshot(SYM, bids=[(D(99), D(1))], asks=[(D(101), D(1))])
    maker = EngineOrderType.LIMIT_MAKER
    with pytest.raises(EngineRejection) as info:
        e.submit(NewOrder("alice", SYM, BUY, maker, quantity=D(1), price=D(101)))
    assert info.value.reason is RejectReason.WOULD_TAKE
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))
    e.submit(limit("bob", SELL, "1", "100.5"))  # a user ask in front of the market's
    with pytest.raises(EngineRejection):
        e.submit(NewOrder("alice", SYM, BUY, maker, quantity=D(1), price=D("100.5")))
    res = e.submit(NewOrder("alice", SYM, BUY, maker, quantity=D(1), price=D("100.49")))
    assert res.order is not None and res.order.status is EngineOrderStatus.NEW and not res.fills


def test_ioc_remainder_expires() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[], asks=[(D(100), D("0.5")), (D(102), D(5))])
    res = e.submit(limit("alice", BUY, "1", "101", time_in_force=IOC))
    order = res.order
    assert order is not None
    assert order.status is EngineOrderStatus.EXPIRED and order.executed_quantity == D("0.5")
    assert [u.execution for u in res.order_updates] == [ExecutionType.NEW, ExecutionType.TRADE, ExecutionType.EXPIRED]
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000) - D(50), D(0))
    assert e.open_orders("alice") == []


def test_fok_not_fillable_expires_with_nothing_filled() -> None:
    e = make_engine()
    e.on_book_snapshot(SYM, bids=[], asks=[(D(100), D("0.5")), (D(102), D(5))])
    e.submit(limit("bob", SELL, "0.3", "100.5"))
    before = e.book(SYM)
    res = e.submit(limit("alice", BUY, "1", "101", time_in_force=FOK))
    order = res.order
    assert order is not None and order.status is EngineOrderStatus.EXPIRED
    assert order.executed_quantity == 0 and not res.fills
    assert [u.execution for u in res.order_updates] == [ExecutionType.NEW, ExecutionType.EXPIRED]
    assert e.book(SYM) == before
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))
    # fillable across user order and market liquidity: fills completely
    res = e.submit(limit("alice", BUY, "0.8", "101", time_in_force=FOK))
    assert res.order is not None and res.order.status is EngineOrderStatus.FILLED


def test_stop_limit_triggers_on_recorded_trade_crossing() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[(D(94), D(5))], asks=[(D(100), D(5))])
    e.on_trade(SYM, D(100), D(1))
    stop = NewOrder(
        "alice", SYM, SELL, EngineOrderType.STOP_LOSS_LIMIT, quantity=D(1), price=D("94.5"), stop_price=D(95)
    )
    res = e.submit(stop)
    order = res.order
    assert order is not None and order.status is EngineOrderStatus.NEW and not order.working
    assert order.working_time is None
    assert e.ledger.balance("alice", "BTC") == LedgerBalance(D(9), D(1))
    assert e.book(SYM).asks == ((D(100), D(5)),)  # a waiting stop is not in the book
    assert not e.on_trade(SYM, D("95.01"), D(1)).order_updates
    res = e.on_trade(SYM, D(95), D(1))
    triggered = res.order_updates[0].order
    assert triggered.working and triggered.status is EngineOrderStatus.NEW
    assert triggered.working_time is not None
    assert e.book(SYM).asks[0] == (D("94.5"), D(1))  # rests as a limit (bid 94 is below)
    assert not e.on_trade(SYM, D("94.4"), D(1)).fills  # below the ask: not through
    res = e.on_trade(SYM, D("94.6"), D("0.4"))  # a buyer paid more than the ask: through
    assert [(f.price, f.quantity, f.is_maker) for f in res.fills] == [(D("94.5"), D("0.4"), True)]


def test_stop_price_that_would_trigger_immediately_is_rejected() -> None:
    e = make_engine()
    e.on_trade(SYM, D(100), D(1))
    with pytest.raises(EngineRejection) as info:
        e.submit(NewOrder("alice", SYM, SELL, EngineOrderType.STOP_LOSS, quantity=D(1), stop_price=D(101)))
    assert info.value.reason is RejectReason.STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY
    with pytest.raises(EngineRejection):
        e.submit(NewOrder("alice", SYM, BUY, EngineOrderType.TAKE_PROFIT, quantity=D(1), stop_price=D(101)))
    e.submit(NewOrder("alice", SYM, SELL, EngineOrderType.TAKE_PROFIT, quantity=D(1), stop_price=D(101)))


def test_stop_market_buy_reserves_with_buffer_and_releases_after() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_trade(SYM, D(100), D(1))  # synthetic book only
    e.submit(NewOrder("alice", SYM, BUY, EngineOrderType.STOP_LOSS, quantity=D(1), stop_price=D(105)))
    # 105 × (1 + 500 bps) reserved
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000) - D("110.25"), D("110.25"))
    res = e.on_trade(SYM, D(105), D(1))
    fill = res.fills[0]
    assert fill.price == D("105.06")  # synthetic ask: 105 × (1 + 5 bps) = 105.0525, up to the tick
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000) - D("105.06"), D(0))
    assert res.order_updates[-1].order.status is EngineOrderStatus.FILLED


def test_trailing_stop_follows_the_peak_and_triggers_at_the_right_price() -> None:
    """Worked by hand: SELL STOP_LOSS, trailingDelta 100 bps (1 %), no stop price, placed at last 100.

    The peak starts at 100. Trades 101 → peak 101 (trigger 99.99); 102 → peak 102 (trigger 100.98);
    101.5 and 101 stay above 100.98; 100.98 reaches it: the order triggers and sells at market (bid 100.90).
    """
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[(D("100.90"), D(5))], asks=[(D("103"), D(5))])
    e.on_trade(SYM, D(100), D(1))
    res = e.submit(NewOrder("alice", SYM, SELL, EngineOrderType.STOP_LOSS, quantity=D(1), trailing_delta_bps=100))
    order = res.order
    assert order is not None and order.trailing_time is not None and not order.working
    for price in ("101", "102", "101.5", "101", "100.99"):
        assert not e.on_trade(SYM, D(price), D(1)).fills, price
    res = e.on_trade(SYM, D("100.98"), D(1))
    assert [(f.price, f.quantity) for f in res.fills] == [(D("100.90"), D(1))]
    final = e.get_order("alice", SYM, order.order_id)
    assert final.status is EngineOrderStatus.FILLED and final.working


def test_trailing_take_profit_activates_at_stop_price() -> None:
    """TAKE_PROFIT SELL, stop 110 (activation), 200 bps: tracks from 110 up; 115 peak → triggers at 112.7."""
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[(D(100), D(5))], asks=[(D(120), D(5))])
    e.on_trade(SYM, D(100), D(1))
    e.submit(
        NewOrder(
            "alice", SYM, SELL, EngineOrderType.TAKE_PROFIT, quantity=D(1), stop_price=D(110), trailing_delta_bps=200
        )
    )
    assert not e.on_trade(SYM, D(105), D(1)).fills  # not activated: a 5 % fall from nothing
    assert not e.on_trade(SYM, D(100), D(1)).fills
    assert not e.on_trade(SYM, D(110), D(1)).fills  # activates
    assert not e.on_trade(SYM, D(115), D(1)).fills
    assert not e.on_trade(SYM, D("112.71"), D(1)).fills
    assert e.on_trade(SYM, D("112.70"), D(1)).fills


def test_iceberg_shows_display_quantity_but_fills_fully() -> None:
    e = make_engine(maker="0", taker="0")
    ice = e.submit(limit("alice", SELL, "1", "100", iceberg_quantity=D("0.2"))).order
    bob = e.submit(limit("bob", SELL, "0.5", "100")).order
    assert ice is not None and bob is not None and ice.iceberg_quantity == D("0.2")
    assert e.book(SYM).asks == ((D(100), D("0.7")),)
    res = e.submit(limit("carol", BUY, "1.2", "100"))
    makers = [(f.order_id, f.quantity) for f in res.fills if f.is_maker]
    # the refilled slice goes behind bob's order: it lost time priority
    assert makers == [
        (ice.order_id, D("0.2")),
        (bob.order_id, D("0.5")),
        (ice.order_id, D("0.2")),
        (ice.order_id, D("0.2")),
        (ice.order_id, D("0.1")),
    ]
    assert e.book(SYM).asks == ((D(100), D("0.1")),)  # 0.3 left, 0.1 of the current slice shown
    res = e.submit(limit("carol", BUY, "0.3", "100"))
    assert sum(f.quantity for f in res.fills if f.is_maker) == D("0.3")
    assert e.get_order("alice", SYM, ice.order_id).status is EngineOrderStatus.FILLED


def test_cancel_replace_success() -> None:
    e = make_engine()
    old = e.submit(limit("alice", BUY, "1", "100", client_order_id="a")).order
    assert old is not None
    res = e.cancel_replace("alice", SYM, limit("alice", BUY, "2", "99", client_order_id="a"), cancel_order_id=1)
    assert [(u.order.order_id, u.execution) for u in res.order_updates] == [
        (1, ExecutionType.CANCELED),
        (2, ExecutionType.NEW),
    ]
    assert e.ledger.balance("alice", "USDT").locked == D(198)


def test_cancel_replace_stop_on_failure() -> None:
    """Binance STOP_ON_FAILURE: filter failures and a failed cancel change nothing; a new order that fails
    on placement (here LIMIT_MAKER would take) leaves the old order cancelled."""
    e = make_engine()
    e.submit(limit("bob", SELL, "1", "100"))
    old = e.submit(limit("alice", BUY, "1", "99", client_order_id="a")).order
    assert old is not None
    with pytest.raises(EngineRejection) as info:  # filter failure of the new order: nothing happens
        e.cancel_replace("alice", SYM, limit("alice", BUY, "1", "99.001"), cancel_order_id=old.order_id)
    assert info.value.reason is RejectReason.PRICE_FILTER
    with pytest.raises(EngineRejection) as info:  # cancel fails: the new order is not attempted
        e.cancel_replace("alice", SYM, limit("alice", BUY, "1", "98"), cancel_order_id=999)
    assert info.value.reason is RejectReason.UNKNOWN_ORDER
    assert e.get_order("alice", SYM, old.order_id).status is EngineOrderStatus.NEW
    assert len(e.all_orders("alice", SYM)) == 1
    would_take = NewOrder("alice", SYM, BUY, EngineOrderType.LIMIT_MAKER, quantity=D(1), price=D(100))
    with pytest.raises(CancelReplacePartialFailureError) as partial:
        e.cancel_replace("alice", SYM, would_take, cancel_client_order_id="a")
    assert partial.value.reason is RejectReason.WOULD_TAKE
    assert [u.execution for u in partial.value.cancel_result.order_updates] == [ExecutionType.CANCELED]
    assert e.get_order("alice", SYM, old.order_id).status is EngineOrderStatus.CANCELED
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))


def test_amend_quantity_keeps_priority_and_releases() -> None:
    e = make_engine(maker="0", taker="0")
    first = e.submit(limit("alice", BUY, "2", "100")).order
    e.submit(limit("bob", BUY, "1", "100"))
    assert first is not None
    res = e.amend_quantity("alice", SYM, D(1), order_id=first.order_id)
    assert res.order_updates[0].execution is ExecutionType.REPLACED
    assert res.order_updates[0].order.quantity == D(1)
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(99_900), D(100))
    res = e.submit(limit("carol", SELL, "1", "100"))
    assert next(f for f in res.fills if f.is_maker).order_id == first.order_id
    with pytest.raises(EngineRejection) as info:
        e.amend_quantity("bob", SYM, D(2), order_id=2)
    assert info.value.reason is RejectReason.INVALID_PARAMETERS


def test_amend_to_executed_quantity_fills_the_order() -> None:
    e = make_engine(maker="0", taker="0")
    order = e.submit(limit("alice", BUY, "2", "100")).order
    assert order is not None
    e.submit(limit("bob", SELL, "0.5", "100"))
    res = e.amend_quantity("alice", SYM, D("0.5"), order_id=order.order_id)
    assert res.order_updates[0].order.status is EngineOrderStatus.FILLED
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(99_950), D(0))
    assert e.book(SYM).bids == ()


def test_gtd_expires_on_advance() -> None:
    clock = ManualClock()
    e = make_engine(clock=clock)
    expire = clock.now + timedelta(hours=1)
    e.submit(limit("alice", BUY, "1", "100", time_in_force=GTD, expire_at=expire))
    clock.now += timedelta(minutes=30)
    assert not e.advance().order_updates
    clock.now = expire
    res = e.advance()
    assert [(u.execution, u.order.status) for u in res.order_updates] == [
        (ExecutionType.EXPIRED, EngineOrderStatus.EXPIRED)
    ]
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))
    assert res.balance_updates[0].free == D(100_000)


def test_market_order_needs_balance_for_what_it_would_cost() -> None:
    e = make_engine()
    e.ledger.deposit("dave", "USDT", D(150))
    e.on_book_snapshot(SYM, bids=[], asks=[(D(100), D(1)), (D(200), D(1))])
    with pytest.raises(EngineRejection) as info:
        e.submit(NewOrder("dave", SYM, BUY, MARKET, quantity=D("1.5")))
    assert info.value.reason is RejectReason.INSUFFICIENT_BALANCE
    res = e.submit(NewOrder("dave", SYM, BUY, MARKET, quantity=D("1.25")))
    assert res.order is not None and res.order.status is EngineOrderStatus.FILLED
    assert e.ledger.balance("dave", "USDT") == LedgerBalance(D(0), D(0))


@pytest.mark.parametrize(
    ("mode", "own_maker", "other_maker", "taker"),
    [
        # alice's own ask at 100 sits before bob's at 100.5; her buy of 1.5 crosses both
        (SelfTradePrevention.NONE, "FILLED", "PARTIALLY_FILLED", "FILLED"),
        (SelfTradePrevention.EXPIRE_MAKER, "EXPIRED_IN_MATCH", "FILLED", "PARTIALLY_FILLED"),
        (SelfTradePrevention.EXPIRE_TAKER, "NEW", "NEW", "EXPIRED_IN_MATCH"),
        (SelfTradePrevention.EXPIRE_BOTH, "EXPIRED_IN_MATCH", "NEW", "EXPIRED_IN_MATCH"),
    ],
)
def test_self_trade_prevention_follows_the_takers_mode(
    mode: SelfTradePrevention, own_maker: str, other_maker: str, taker: str
) -> None:
    e = make_engine()
    mine = e.submit(limit("alice", SELL, "1", "100")).order
    theirs = e.submit(limit("bob", SELL, "1", "100.5")).order
    assert mine is not None and theirs is not None
    res = e.submit(limit("alice", BUY, "1.5", "101", self_trade_prevention=mode))
    assert res.order is not None and res.order.self_trade_prevention is mode
    statuses = (
        e.get_order("alice", SYM, order_id=mine.order_id).status,
        e.get_order("bob", SYM, order_id=theirs.order_id).status,
        e.get_order("alice", SYM, order_id=res.order.order_id).status,
    )
    assert statuses == (EngineOrderStatus(own_maker), EngineOrderStatus(other_maker), EngineOrderStatus(taker))
    traded_with_self = any(f.order_id == mine.order_id for f in res.fills)
    assert traded_with_self is (mode is SelfTradePrevention.NONE)
    prevented = [u for u in res.order_updates if u.execution is ExecutionType.TRADE_PREVENTION]
    assert len(prevented) == {"NONE": 0, "EXPIRE_MAKER": 1, "EXPIRE_TAKER": 1, "EXPIRE_BOTH": 2}[mode.value]
    # an expired taker released what it had locked; one still resting keeps a lock
    assert (e.ledger.balance("alice", "USDT").locked > 0) is (taker == "PARTIALLY_FILLED")
