"""Property tests: random order flow and market data keep the engine's invariants."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal as D
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltica.domain import Side
from meltica.matching import (
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    MatchingEngine,
    MatchResult,
    NewOrder,
)
from tests.unit.test_matching_core import SYM, make_engine

ACCOUNTS = ("alice", "bob", "carol")
prices = st.integers(min_value=180, max_value=220).map(lambda i: D(i) / 2)  # 90.0 .. 110.0 by 0.5
quantities = st.integers(min_value=60, max_value=3000).map(lambda i: D(i) / 1000)
sides = st.sampled_from([Side.BUY, Side.SELL])
accounts = st.sampled_from(ACCOUNTS)


@st.composite
def new_orders(draw: st.DrawFn) -> NewOrder:
    account, side, qty = draw(accounts), draw(sides), draw(quantities)
    kind = draw(st.sampled_from(["limit", "ioc", "fok", "maker", "market", "iceberg", "stop", "stop_limit", "trail"]))
    if kind == "market":
        if draw(st.booleans()):
            return NewOrder(account, SYM, side, EngineOrderType.MARKET, quantity=qty)
        return NewOrder(account, SYM, side, EngineOrderType.MARKET, quote_quantity=draw(quantities) * 100)
    price = draw(prices)
    if kind in ("limit", "ioc", "fok", "iceberg"):
        tif = {"ioc": EngineTimeInForce.IOC, "fok": EngineTimeInForce.FOK}.get(kind, EngineTimeInForce.GTC)
        iceberg = (qty / 3).quantize(D("0.001")) if kind == "iceberg" else None
        return NewOrder(
            account,
            SYM,
            side,
            EngineOrderType.LIMIT,
            quantity=qty,
            price=price,
            time_in_force=tif,
            iceberg_quantity=iceberg,
        )
    if kind == "maker":
        return NewOrder(account, SYM, side, EngineOrderType.LIMIT_MAKER, quantity=qty, price=price)
    stop_type = draw(st.sampled_from([EngineOrderType.STOP_LOSS, EngineOrderType.TAKE_PROFIT]))
    if kind == "trail":
        return NewOrder(account, SYM, side, stop_type, quantity=qty, trailing_delta_bps=draw(st.integers(10, 500)))
    if kind == "stop":
        return NewOrder(account, SYM, side, stop_type, quantity=qty, stop_price=draw(prices))
    limit_type = (
        EngineOrderType.STOP_LOSS_LIMIT if stop_type is EngineOrderType.STOP_LOSS else EngineOrderType.TAKE_PROFIT_LIMIT
    )
    return NewOrder(account, SYM, side, limit_type, quantity=qty, price=price, stop_price=draw(prices))


operations = st.one_of(
    new_orders().map(lambda o: ("submit", o)),
    new_orders().map(lambda o: ("submit", o)),
    new_orders().map(lambda o: ("submit", o)),
    st.tuples(st.just("cancel"), accounts, st.integers(1, 6)),
    st.tuples(st.just("amend"), accounts, st.integers(1, 6), quantities),
    st.tuples(st.just("trade"), prices, quantities, st.sampled_from([None, Side.BUY, Side.SELL])),
    st.tuples(st.just("bar"), prices, prices, prices, quantities),
    st.tuples(st.just("book"), prices, quantities),
    st.tuples(st.just("replace"), accounts, st.integers(1, 6), new_orders()),
)


def totals(e: MatchingEngine) -> dict[str, D]:
    out: dict[str, D] = defaultdict(D)
    for account in ACCOUNTS:
        for asset, bal in e.ledger.balances(account).items():
            out[asset] += bal.free + bal.locked
    return out


def fill_flows(result: MatchResult) -> dict[str, D]:
    out: dict[str, D] = defaultdict(D)
    for f in result.fills:
        if f.side is Side.BUY:
            out["BTC"] += f.quantity - f.commission
            out["USDT"] -= f.quote_quantity
        else:
            out["BTC"] -= f.quantity
            out["USDT"] += f.quote_quantity - f.commission
    return out


def state(e: MatchingEngine) -> Any:
    return (
        [e.ledger.balances(a) for a in ACCOUNTS],
        [e.open_orders(a) for a in ACCOUNTS],
        e.book(SYM),
    )


def check_invariants(e: MatchingEngine) -> None:
    locked: dict[tuple[str, str], D] = defaultdict(D)
    for account in ACCOUNTS:
        for asset, bal in e.ledger.balances(account).items():
            assert bal.free >= 0 and bal.locked >= 0, (account, asset, bal)
        for order in e.all_orders(account, SYM):
            assert 0 <= order.executed_quantity <= order.quantity
            if order.is_open:
                assert order.executed_quantity < order.quantity
    for order in e._orders.values():  # test-only: reservations add up to the locked balances
        if order.status.is_open:
            assert order.reserved >= 0
            locked[(order.account, order.reserve_asset)] += order.reserved
    for account in ACCOUNTS:
        for asset, bal in e.ledger.balances(account).items():
            assert bal.locked == locked[(account, asset)], (account, asset)
    market = e._markets[SYM]
    best_bid, best_ask = market.user_bids.best(), market.user_asks.best()
    assert best_bid is None or best_ask is None or best_bid < best_ask, (best_bid, best_ask)


def run(e: MatchingEngine, op: tuple[Any, ...]) -> MatchResult:
    kind = op[0]
    if kind in ("cancel", "amend", "replace") and op[1] != "carol":  # mostly aim at an open order
        open_orders = [o for a in ACCOUNTS for o in e.open_orders(a)]
        if open_orders:
            target = open_orders[op[2] % len(open_orders)]
            op = (kind, target.account, target.order_id, *op[3:])
    if kind == "submit":
        return e.submit(op[1])
    if kind == "cancel":
        return e.cancel(op[1], SYM, order_id=op[2])
    if kind == "amend":
        return e.amend_quantity(op[1], SYM, op[3], order_id=op[2])
    if kind == "trade":
        return e.on_trade(SYM, op[1], op[2], taker_side=op[3])
    if kind == "bar":
        low, high = min(op[1:4]), max(op[1:4])
        return e.on_bar(SYM, op[1], high, low, op[3], op[4])
    if kind == "book":
        mid = op[1]
        return e.on_book_snapshot(SYM, bids=[(mid - 1, op[2]), (mid - 2, D(5))], asks=[(mid + 1, op[2])])
    new: NewOrder = op[3]
    return e.cancel_replace(op[1], SYM, NewOrder(**{**_fields(new), "account": op[1]}), cancel_order_id=op[2])


def _fields(order: NewOrder) -> dict[str, Any]:
    return {name: getattr(order, name) for name in order.__slots__}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, min_size=1, max_size=40))
def test_random_flow_keeps_invariants(ops: list[tuple[Any, ...]]) -> None:
    e = make_engine(maker="0.001", taker="0.002")
    for account in ACCOUNTS:  # smaller balances so insufficient-funds paths run too
        e.ledger.withdraw(account, "USDT", D(99_500))
        e.ledger.withdraw(account, "BTC", D(7))
    e.on_trade(SYM, D(100), D(1))
    for op in ops:
        before_state, before_totals = state(e), totals(e)
        try:
            result = run(e, op)
        except EngineRejection as exc:
            partial = getattr(exc, "cancel_result", None)
            if partial is None:
                assert state(e) == before_state, op  # a rejection changes nothing
                continue
            result = partial
        after = totals(e)
        flows = fill_flows(result)
        for asset in ("BTC", "USDT"):
            assert after[asset] - before_totals[asset] == flows[asset], (op, asset)
        check_invariants(e)


def replay(ops: list[tuple[Any, ...]]) -> list[object]:
    """The engine's results over ``ops``: compared across processes with different hash seeds in
    ``test_determinism_across_processes.py``."""
    e = make_engine()
    e.on_trade(SYM, D(100), D(1))
    out: list[object] = []
    for op in ops:
        try:
            out.append(run(e, op))
        except EngineRejection as exc:
            out.append((exc.reason, exc.message))
    return out
