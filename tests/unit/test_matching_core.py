"""Matching engine core: limit/market, price-time priority, fees, reservations, cancel, rejections."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest

from meltica.domain import Side
from meltica.errors import InsufficientFundsError, InvalidOrderError, OrderNotFoundError
from meltica.matching import (
    EngineOrderStatus,
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    ExecutionType,
    FeeSchedule,
    LedgerBalance,
    MatchingEngine,
    NewOrder,
    RejectReason,
)
from tests.kit import ManualClock, spot_instrument

SYM = "BTCUSDT"
BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = EngineOrderType.LIMIT, EngineOrderType.MARKET


def make_engine(maker: str = "0.001", taker: str = "0.002", clock: ManualClock | None = None) -> MatchingEngine:
    engine = MatchingEngine(clock=clock or ManualClock(), fees=FeeSchedule(maker=D(maker), taker=D(taker)))
    instrument = spot_instrument("BTC/USDT", "binance", step_size="0.001")
    engine.add_instrument(instrument, SYM)
    for account in ("alice", "bob", "carol"):
        engine.ledger.deposit(account, "USDT", D(100_000))
        engine.ledger.deposit(account, "BTC", D(10))
    return engine


def limit(account: str, side: Side, qty: str, price: str, **kw: object) -> NewOrder:
    return NewOrder(account, SYM, side, LIMIT, quantity=D(qty), price=D(price), **kw)  # type: ignore[arg-type]


def test_price_time_priority_across_accounts() -> None:
    e = make_engine()
    a1 = e.submit(limit("alice", SELL, "1", "100")).order
    b1 = e.submit(limit("bob", SELL, "1", "100")).order
    a2 = e.submit(limit("alice", SELL, "1", "99.5")).order
    assert a1 and b1 and a2
    res = e.submit(limit("carol", BUY, "2.5", "100"))
    maker_ids = [f.order_id for f in res.fills if f.is_maker]
    assert maker_ids == [a2.order_id, a1.order_id, b1.order_id]
    assert [f.price for f in res.fills if f.is_maker] == [D("99.5"), D(100), D(100)]
    assert e.get_order("bob", SYM, b1.order_id).executed_quantity == D("0.5")
    assert e.get_order("bob", SYM, b1.order_id).status is EngineOrderStatus.PARTIALLY_FILLED
    taker = e.get_order("carol", SYM, res.order.order_id)  # type: ignore[union-attr]
    assert taker.status is EngineOrderStatus.FILLED
    assert taker.cumulative_quote_quantity == D("99.5") + D(100) + D(50)
    assert [t.trade_id for t in res.public_trades] == [1, 2, 3]
    assert res.order_updates[0].execution is ExecutionType.NEW


def test_partial_fill_rests_remainder_and_book_shows_it() -> None:
    e = make_engine()
    e.submit(limit("alice", SELL, "0.4", "101"))
    res = e.submit(limit("bob", BUY, "1", "101"))
    order = res.order
    assert order is not None and order.status is EngineOrderStatus.PARTIALLY_FILLED
    assert order.executed_quantity == D("0.4")
    view = e.book(SYM)
    assert view.bids == ((D(101), D("0.6")),)
    assert view.asks == ()
    # bob locked 101 * 1, spent 101 * 0.4 = 40.4: 60.6 still locked
    assert e.ledger.balance("bob", "USDT") == LedgerBalance(D(100_000) - D(101), D("60.6"))


def test_market_order_walks_recorded_book_levels() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[(D(99), D(5))], asks=[(D(100), D("0.5")), (D(101), D(1)), (D(102), D(3))])
    res = e.submit(NewOrder("alice", SYM, BUY, MARKET, quantity=D("2")))
    assert [(f.price, f.quantity) for f in res.fills] == [(D(100), D("0.5")), (D(101), D(1)), (D(102), D("0.5"))]
    order = res.order
    assert order is not None and order.status is EngineOrderStatus.FILLED
    assert order.cumulative_quote_quantity == D(50) + D(101) + D(51)
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000) - D(202), D(0))
    assert e.ledger.balance("alice", "BTC") == LedgerBalance(D(12), D(0))
    # consumed liquidity stays consumed until that level is updated
    assert e.book(SYM).asks == ((D(102), D("2.5")),)
    e.on_book_delta(SYM, bids=[], asks=[(D(100), D(4))])
    assert e.book(SYM).asks[0] == (D(100), D(4))
    assert e.last_price(SYM) == D(102)


def test_market_order_without_liquidity_expires() -> None:
    e = make_engine()
    res = e.submit(NewOrder("alice", SYM, SELL, MARKET, quantity=D("1")))
    assert res.order is not None and res.order.status is EngineOrderStatus.EXPIRED
    assert e.ledger.balance("alice", "BTC") == LedgerBalance(D(10), D(0))


def test_market_buy_by_quote_quantity() -> None:
    e = make_engine(maker="0", taker="0")
    e.on_book_snapshot(SYM, bids=[], asks=[(D(100), D(1)), (D(200), D(1))])
    res = e.submit(NewOrder("alice", SYM, BUY, MARKET, quote_quantity=D(150)))
    order = res.order
    assert order is not None
    assert order.status is EngineOrderStatus.FILLED
    assert order.quantity == order.executed_quantity == D("1.25")
    assert order.cumulative_quote_quantity == D(150)
    assert order.quote_quantity == D(150)


def test_fees_maker_and_taker_in_received_asset() -> None:
    e = make_engine(maker="0.001", taker="0.002")
    e.submit(limit("alice", SELL, "0.5", "30000.01"))
    res = e.submit(limit("bob", BUY, "0.5", "30000.01"))
    maker = next(f for f in res.fills if f.is_maker)
    taker = next(f for f in res.fills if not f.is_maker)
    # seller (alice, maker) receives quote: 15000.005 * 0.001
    assert maker.commission == D("15.000005") and maker.commission_asset == "USDT"
    # buyer (bob, taker) receives base: 0.5 * 0.002
    assert taker.commission == D("0.001") and taker.commission_asset == "BTC"
    assert maker.trade_id == taker.trade_id
    assert e.ledger.balance("alice", "USDT").free == D(100_000) + D("15000.005") - D("15.000005")
    assert e.ledger.balance("alice", "BTC") == LedgerBalance(D("9.5"), D(0))
    assert e.ledger.balance("bob", "BTC").free == D(10) + D("0.5") - D("0.001")
    assert e.ledger.balance("bob", "USDT") == LedgerBalance(D(100_000) - D("15000.005"), D(0))
    e.set_fees("carol", FeeSchedule(maker=D(0), taker=D(0)))
    e.submit(limit("alice", SELL, "0.1", "30000"))
    res = e.submit(limit("carol", BUY, "0.1", "30000"))
    assert next(f for f in res.fills if not f.is_maker).commission == 0


def test_reservation_and_release_on_cancel() -> None:
    e = make_engine()
    res = e.submit(limit("alice", BUY, "2", "100"))
    order = res.order
    assert order is not None
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(99_800), D(200))
    assert res.balance_updates[-1].locked == D(200)
    sell = e.submit(limit("bob", SELL, "3", "150")).order
    assert sell is not None
    assert e.ledger.balance("bob", "BTC") == LedgerBalance(D(7), D(3))
    cancelled = e.cancel("alice", SYM, order_id=order.order_id)
    assert cancelled.order_updates[0].execution is ExecutionType.CANCELED
    assert cancelled.order_updates[0].order.status is EngineOrderStatus.CANCELED
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))
    e.cancel("bob", SYM, client_order_id=sell.client_order_id)
    assert e.ledger.balance("bob", "BTC") == LedgerBalance(D(10), D(0))
    with pytest.raises(EngineRejection) as info:
        e.cancel("alice", SYM, order_id=order.order_id)
    assert info.value.reason is RejectReason.UNKNOWN_ORDER
    assert isinstance(info.value, OrderNotFoundError)
    assert e.open_orders("alice") == []
    assert len(e.all_orders("alice", SYM)) == 1


def test_limit_buy_filled_at_better_price_releases_the_difference() -> None:
    e = make_engine(maker="0", taker="0")
    e.submit(limit("alice", SELL, "1", "90"))
    e.submit(limit("bob", BUY, "1", "100"))
    assert e.ledger.balance("bob", "USDT") == LedgerBalance(D(100_000) - D(90), D(0))


def test_insufficient_balance_rejection_changes_nothing() -> None:
    e = make_engine()
    e.submit(limit("alice", SELL, "1", "100"))
    before = (e.ledger.balances("bob"), e.book(SYM), e.open_orders("bob"))
    with pytest.raises(EngineRejection) as info:
        e.submit(limit("bob", BUY, "1001", "100"))
    assert info.value.reason is RejectReason.INSUFFICIENT_BALANCE
    assert info.value.reject_reason is RejectReason.INSUFFICIENT_BALANCE
    assert isinstance(info.value, InsufficientFundsError)
    with pytest.raises(EngineRejection):
        e.submit(limit("bob", SELL, "11", "200"))
    assert (e.ledger.balances("bob"), e.book(SYM), e.open_orders("bob")) == before
    # the next order id is still the next integer: the rejection consumed nothing
    assert e.submit(limit("bob", BUY, "0.1", "50")).order.order_id == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        (limit("alice", BUY, "1", "100.001"), RejectReason.PRICE_FILTER),
        (limit("alice", BUY, "1.0001", "100"), RejectReason.LOT_SIZE),
        (limit("alice", BUY, "0.01", "100"), RejectReason.MIN_NOTIONAL),
        (NewOrder("alice", SYM, BUY, LIMIT, quantity=D(1)), RejectReason.INVALID_PARAMETERS),
        (NewOrder("alice", "ETHUSDT", BUY, LIMIT, quantity=D(1), price=D(1)), RejectReason.UNKNOWN_SYMBOL),
        (NewOrder("alice", SYM, BUY, MARKET), RejectReason.INVALID_PARAMETERS),
        (
            NewOrder("alice", SYM, BUY, EngineOrderType.STOP_LOSS, quantity=D(1)),
            RejectReason.INVALID_PARAMETERS,
        ),
        (limit("alice", BUY, "1", "100", time_in_force=EngineTimeInForce.GTD), RejectReason.INVALID_PARAMETERS),
    ],
)
def test_filter_and_parameter_rejections(order: NewOrder, reason: RejectReason) -> None:
    e = make_engine()
    with pytest.raises(EngineRejection) as info:
        e.submit(order)
    assert info.value.reason is reason
    if reason is not RejectReason.INSUFFICIENT_BALANCE:
        assert isinstance(info.value, InvalidOrderError)
    assert e.ledger.balance("alice", "USDT") == LedgerBalance(D(100_000), D(0))


def test_duplicate_client_order_id_among_open_orders() -> None:
    e = make_engine()
    e.submit(limit("alice", BUY, "1", "100", client_order_id="x1"))
    with pytest.raises(EngineRejection) as info:
        e.submit(limit("alice", BUY, "1", "100", client_order_id="x1"))
    assert info.value.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID
    e.cancel("alice", SYM, client_order_id="x1")
    e.submit(limit("alice", BUY, "1", "100", client_order_id="x1"))  # reusable once closed
    e.submit(limit("bob", BUY, "1", "100", client_order_id="x1"))  # per account


def test_max_open_orders() -> None:
    e = make_engine()
    e.max_open_orders = 2
    e.submit(limit("alice", BUY, "1", "100"))
    e.submit(limit("alice", BUY, "1", "100"))
    with pytest.raises(EngineRejection) as info:
        e.submit(limit("alice", BUY, "1", "100"))
    assert info.value.reason is RejectReason.MAX_NUM_ORDERS


def test_cancel_all_and_queries() -> None:
    e = make_engine()
    e.submit(limit("alice", BUY, "1", "100"))
    e.submit(limit("alice", SELL, "1", "200"))
    res = e.cancel_all("alice", SYM)
    assert [u.order.status for u in res.order_updates] == [EngineOrderStatus.CANCELED] * 2
    assert e.open_orders("alice", SYM) == []
    with pytest.raises(EngineRejection):
        e.cancel_all("alice", SYM)
    with pytest.raises(EngineRejection) as info:
        e.get_order("bob", SYM, order_id=1)
    assert info.value.reason is RejectReason.UNKNOWN_ORDER


def test_deterministic_ids_and_updates() -> None:
    def run() -> list[object]:
        e = make_engine()
        out: list[object] = []
        e.on_book_snapshot(SYM, bids=[(D(99), D(1))], asks=[(D(101), D(1))])
        out.append(e.submit(limit("alice", SELL, "0.5", "100.5")))
        out.append(e.submit(limit("bob", BUY, "1", "101")))
        out.append(e.on_trade(SYM, D(100), D(1)))
        return out

    assert run() == run()


def test_times_come_from_the_clock() -> None:
    clock = ManualClock()
    e = make_engine(clock=clock)
    res = e.submit(limit("alice", BUY, "1", "100"))
    clock.now += timedelta(seconds=5)
    e.submit(limit("bob", SELL, "1", "100"))
    order = e.get_order("alice", SYM, res.order.order_id)  # type: ignore[union-attr]
    assert order.time == datetime(2024, 1, 1, tzinfo=UTC)
    assert order.update_time == datetime(2024, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert order.working and order.working_time == order.time
    fills = e.account_trades("alice", SYM)
    assert len(fills) == 1 and fills[0].is_maker and fills[0].time == order.update_time


def test_submit_taker_does_what_submit_does_without_the_reports() -> None:
    """``submit_taker`` (the backtest's in-process path): the same order, fills, ids, balances, book and
    history as ``submit``; refused, before anything changes, while any user order rests or waits."""
    engines = [make_engine(), make_engine()]
    for e in engines:
        e.on_book_snapshot(SYM, bids=[(D(99), D(5))], asks=[(D(100), D("0.5")), (D(101), D(1)), (D(102), D(3))])
    orders = [
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("1.2"), client_order_id="a"),
        NewOrder("alice", SYM, SELL, MARKET, quantity=D("0.7"), client_order_id="b"),
    ]
    by_submit, by_taker = engines
    for new in orders:
        result = by_submit.submit(new)
        order_id, status, fills = by_taker.submit_taker(new)
        assert result.order is not None and (result.order.order_id, result.order.status) == (order_id, status)
        assert result.fills == fills and len(fills) >= 1
        assert by_taker.get_order("alice", SYM, order_id) == result.order
    for account in ("alice", "bob"):
        for asset in ("USDT", "BTC"):
            assert by_submit.ledger.balance(account, asset) == by_taker.ledger.balance(account, asset)
    assert by_submit.book(SYM) == by_taker.book(SYM)
    assert by_submit.all_orders("alice", SYM) == by_taker.all_orders("alice", SYM)
    assert by_submit.account_trades("alice", SYM) == by_taker.account_trades("alice", SYM)
    # a resting order of any user: refused, nothing changed
    by_taker.submit(limit("bob", SELL, "1", "105"))
    before = (by_taker.ledger.balance("alice", "USDT"), by_taker.book(SYM), by_taker.all_orders("alice", SYM))
    with pytest.raises(EngineRejection):
        by_taker.submit_taker(NewOrder("alice", SYM, BUY, MARKET, quantity=D("0.1")))
    assert before == (by_taker.ledger.balance("alice", "USDT"), by_taker.book(SYM), by_taker.all_orders("alice", SYM))
    # and the reports come back for the next submit
    assert by_taker.submit(NewOrder("alice", SYM, BUY, MARKET, quantity=D("0.1"))).order_updates


def _engine_state(e: MatchingEngine) -> tuple[object, ...]:
    """Everything an engine shows, numbers as their strings too (the same value must be the same Decimal)."""
    balances = {(a, asset): e.ledger.balance(a, asset) for a in ("alice", "bob") for asset in ("USDT", "BTC")}
    orders = e.all_orders("alice", SYM) + e.all_orders("bob", SYM)
    trades = e.account_trades("alice", SYM) + e.account_trades("bob", SYM)
    return (
        balances,
        repr(balances),
        e.book(SYM),
        repr(e.book(SYM)),
        orders,
        repr(orders),
        trades,
        repr(trades),
        e.has_open_orders("alice"),
        e.last_price(SYM),
        dict(e._open_count),
        {a: dict(o) for a, o in e._open.items()},
        e.next_trade_id(SYM),
    )


@pytest.mark.parametrize(
    "fees",
    [
        FeeSchedule(maker=D("0.001"), taker=D("0.002")),
        FeeSchedule(maker=D("0.001"), taker=D("0.001"), quote_commission=True),
        FeeSchedule(maker=D("-0.0002"), taker=D("0.0005"), quote_commission=True),
        FeeSchedule(maker=D(0), taker=D(0)),
    ],
)
def test_submit_taker_at_one_level_equals_submit(fees: FeeSchedule) -> None:
    """``submit_taker``'s straight line (a market order the best level fills whole, ``_quick_taker``): the
    same fills, orders, ids, balances, book, last price and refusals as ``submit``, digit for digit — buys
    and sells, with and without client order ids, quantities written in odd exponents, a fill of a whole
    level and one beyond it (the general walk), and the balance refusal."""
    engines = [make_engine(), make_engine()]
    for e in engines:
        e.set_fees("alice", fees)
        e.set_fees("bob", fees)
        e.ledger.withdraw("bob", "USDT", D(99_800))  # 200 left
        e.on_book_snapshot(SYM, bids=[(D("99.5"), D(50)), (D(99), D(9))], asks=[(D("100.5"), D(4)), (D(101), D(9))])
    by_submit, by_taker = engines
    orders = [
        NewOrder("bob", SYM, BUY, MARKET, quantity=D("2"), client_order_id="f"),  # not enough USDT
        NewOrder("bob", SYM, SELL, MARKET, quantity=D("11"), client_order_id="g"),  # not enough BTC
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("1.2"), client_order_id="a"),
        NewOrder("alice", SYM, SELL, MARKET, quantity=D("0.700"), client_order_id="b"),
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("1E+0")),
        NewOrder("alice", SYM, SELL, MARKET, quantity=D("2.001"), client_order_id="c"),
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("1.8"), client_order_id="d"),  # the rest of the level
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("3"), client_order_id="e"),  # beyond it: the walk
        NewOrder("bob", SYM, BUY, MARKET, quantity=D("0.001"), client_order_id="h"),
        NewOrder("alice", SYM, BUY, MARKET, quantity=D("0.0005"), client_order_id="i"),  # off the lot size
    ]
    refused = 0
    for new in orders:
        refusal: tuple[object, str] | None = None
        try:
            result = by_submit.submit(new)
        except EngineRejection as exc:
            refusal = (exc.reason, str(exc))
        if refusal is not None:
            refused += 1
            with pytest.raises(EngineRejection) as caught:
                by_taker.submit_taker(new)
            assert (caught.value.reason, str(caught.value)) == refusal
        else:
            order_id, status, fills = by_taker.submit_taker(new)
            assert result.order is not None and (result.order.order_id, result.order.status) == (order_id, status)
            assert result.fills == fills and repr(result.fills) == repr(fills)
        assert _engine_state(by_submit) == _engine_state(by_taker)
    assert refused == 4
