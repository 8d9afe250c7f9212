"""The paper venue behind the ExchangeAdapter interface: orders, user events, stops, amend, balances."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import TypeVar

import pytest

from meltica.adapters.base import ExchangeAdapter, UserEvent, UserEventKind
from meltica.adapters.in_process import InProcessAdapter, InProcessVenue
from meltica.domain import (
    Bar,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    Trade,
    client_order_id_for,
)
from meltica.errors import InsufficientFundsError, InvalidOrderError, OrderNotFoundError
from tests.kit import ManualClock, spot_instrument

T = TypeVar("T")
SYMBOL = "BTC/USDT"
T0 = datetime(2022, 1, 10, tzinfo=UTC)


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def make_venue() -> tuple[InProcessVenue, ManualClock]:
    clock = ManualClock(T0)
    instrument = spot_instrument(SYMBOL)
    venue = InProcessVenue([instrument], clock=clock)
    for account in ("alice", "bob"):
        venue.deposit(account, "USDT", D(100_000))
        venue.deposit(account, "BTC", D(2))
    return venue, clock


_seq = iter(range(1, 1_000_000))


def intent(account: str, side: Side, order_type: OrderType, qty: str, **kw: object) -> OrderIntent:
    return OrderIntent(
        intent_id=f"i-{next(_seq)}",
        account=account,
        strategy="test",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=order_type,
        quantity=D(qty),
        created_at=T0,
        **kw,  # type: ignore[arg-type]
    )


async def place(adapter: InProcessAdapter, order_intent: OrderIntent) -> tuple[str, object]:
    coid = client_order_id_for(order_intent.intent_id)
    return coid, await adapter.create_order(order_intent, coid)


def trade(price: str, qty: str = "5", side: Side | None = None, n: int = 0) -> Trade:
    return Trade(
        exchange="paper",
        symbol=SYMBOL,
        trade_id=f"t{n}-{price}",
        price=D(price),
        quantity=D(qty),
        aggressor_side=side,
        ts=T0,
    )


def test_in_process_adapter_has_every_protocol_method_with_the_same_parameters() -> None:
    # isinstance() against a runtime Protocol only checks that the names exist; the parameters matter too.
    import inspect

    venue, _ = make_venue()
    adapter = venue.adapter("alice")
    members = [n for n, v in vars(ExchangeAdapter).items() if callable(v) and not n.startswith("_")]
    assert {"create_order", "cancel_order", "fetch_open_orders", "stream_user_events"} <= set(members)
    for name in members:
        wanted = list(inspect.signature(getattr(ExchangeAdapter, name)).parameters)[1:]
        got = list(inspect.signature(getattr(adapter, name)).parameters)
        assert got == wanted, f"InProcessAdapter.{name}{got} differs from ExchangeAdapter.{name}{wanted}"


def test_resting_limit_fills_against_another_account_with_events_fees_and_balances() -> None:
    venue, _ = make_venue()
    alice, bob = venue.adapter("alice"), venue.adapter("bob")

    async def scenario() -> list[UserEvent]:
        events: list[UserEvent] = []
        stream = alice.stream_user_events()

        async def collect() -> None:
            async for event in stream:
                events.append(event)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)  # the collector subscribes before the orders exist (a condition, not a wait)
        coid, order = await place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "0.5", price=D("40000.004")))
        assert order.status is OrderStatus.OPEN  # type: ignore[attr-defined]
        assert order.price == D("40000.00")  # type: ignore[attr-defined]  # buy rounds down to the tick
        _, taker = await place(bob, intent("bob", Side.SELL, OrderType.MARKET, "0.2"))
        assert taker.status is OrderStatus.FILLED  # type: ignore[attr-defined]
        wanted = {UserEventKind.ORDER, UserEventKind.FILL, UserEventKind.BALANCE}
        for _ in range(100):  # event-loop turns (the venue is in this process): until the stream delivered them
            if wanted <= {e.kind for e in events}:
                break
            await asyncio.sleep(0)
        collector.cancel()
        fetched = await alice.fetch_order(SYMBOL, client_order_id=coid)
        assert fetched.status is OrderStatus.PARTIALLY_FILLED
        assert fetched.filled_quantity == D("0.2")
        assert fetched.average_fill_price == D("40000.00")
        return events

    events = run(scenario())
    kinds = [e.kind for e in events]
    assert UserEventKind.ORDER in kinds and UserEventKind.FILL in kinds and UserEventKind.BALANCE in kinds
    fill = next(e.fill for e in events if e.fill is not None)
    assert fill.price == D("40000.00") and fill.quantity == D("0.2")
    assert fill.fee == D("0.0002") and fill.fee_currency == "BTC"  # maker 0.1 % in the asset received
    balances = run(alice.fetch_balances())
    # 0.5 × 40000 locked at placement; 0.2 × 40000 spent; the rest still locked
    assert balances["USDT"].locked == D("12000.0000")
    assert balances["USDT"].free == D("100000") - D("20000.000")
    assert balances["BTC"].free == D("2") + D("0.2") - D("0.0002")
    bob_balances = run(bob.fetch_balances())
    assert bob_balances["USDT"].free == D("100000") + D("8000.000") - D("8.000000")  # taker fee in USDT


def test_stop_limit_triggers_on_a_recorded_trade_and_rests() -> None:
    venue, _ = make_venue()
    alice = venue.adapter("alice")
    venue.on_trade(trade("41000"))
    coid, placed = run(
        place(
            alice,
            intent("alice", Side.SELL, OrderType.STOP_LIMIT, "0.1", trigger_price=D("40000"), price=D("39900")),
        )
    )
    assert placed.status is OrderStatus.OPEN  # type: ignore[attr-defined]
    venue.on_trade(trade("40500", n=1))
    assert run(alice.fetch_order(SYMBOL, client_order_id=coid)).filled_quantity == 0
    venue.on_trade(trade("39999", n=2))  # crosses the stop: becomes a limit sell at 39900, marketable
    after = run(alice.fetch_order(SYMBOL, client_order_id=coid))
    assert after.status is OrderStatus.FILLED
    # It sold into the (synthetic) bids right below 39999, never below its 39900 limit.
    assert after.average_fill_price is not None
    assert D("39900") <= after.average_fill_price < D("39999")


def test_trailing_stop_percentage_follows_the_peak() -> None:
    venue, _ = make_venue()
    alice = venue.adapter("alice")
    venue.on_trade(trade("40000"))
    coid, _ = run(place(alice, intent("alice", Side.SELL, OrderType.TRAILING_STOP, "0.1", trailing_offset_pct=D("1"))))
    for n, price in enumerate(["40400", "41000", "40700"], start=1):
        venue.on_trade(trade(price, n=n))
    assert run(alice.fetch_order(SYMBOL, client_order_id=coid)).status is OrderStatus.OPEN
    venue.on_trade(trade("40589", n=9))  # 1 % below the 41000 peak is 40590
    assert run(alice.fetch_order(SYMBOL, client_order_id=coid)).status is OrderStatus.FILLED


def test_amend_price_is_cancel_replace_and_quantity_reduction_keeps_the_order() -> None:
    venue, _ = make_venue()
    alice = venue.adapter("alice")
    coid, _ = run(place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "0.3", price=D("39000"))))
    reduced = run(alice.amend_order(SYMBOL, client_order_id=coid, new_client_order_id="unused", quantity=D("0.2")))
    assert reduced.client_order_id == coid and reduced.quantity == D("0.2")
    moved = run(alice.amend_order(SYMBOL, client_order_id=coid, new_client_order_id="mlt-moved", price=D("39500")))
    assert moved.client_order_id == "mlt-moved" and moved.price == D("39500") and moved.status is OrderStatus.OPEN
    assert run(alice.fetch_order(SYMBOL, client_order_id=coid)).status is OrderStatus.CANCELLED
    assert [o.client_order_id for o in run(alice.fetch_open_orders(SYMBOL))] == ["mlt-moved"]
    assert run(alice.fetch_balances())["USDT"].locked == D("7900.0")  # 0.2 × 39500


def test_bars_drive_fills_and_gtd_expiry() -> None:
    venue, clock = make_venue()
    alice = venue.adapter("alice")
    bar = Bar(
        exchange="paper",
        symbol=SYMBOL,
        timeframe="1m",
        ts=T0,
        open=D("40000"),
        high=D("40100"),
        low=D("39800"),
        close=D("40050"),
        volume=D("12"),
    )
    venue.on_bar(bar)
    buy_coid, _ = run(place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "0.1", price=D("39850"))))
    gtd_coid, _ = run(
        place(
            alice,
            intent(
                "alice",
                Side.BUY,
                OrderType.LIMIT,
                "0.1",
                price=D("39000"),
                time_in_force=TimeInForce.GTD,
                expire_at=T0 + timedelta(minutes=5),
            ),
        )
    )
    venue.on_bar(bar.model_copy(update={"ts": T0 + timedelta(minutes=1), "low": D("39700")}))
    assert run(alice.fetch_order(SYMBOL, client_order_id=buy_coid)).status is OrderStatus.FILLED
    clock.now = T0 + timedelta(minutes=6)
    venue.advance()
    assert run(alice.fetch_order(SYMBOL, client_order_id=gtd_coid)).status is OrderStatus.EXPIRED
    assert run(alice.fetch_ohlcv(SYMBOL, "1m"))[0] == bar


def test_rejections_are_taxonomy_errors_and_change_nothing() -> None:
    venue, _ = make_venue()
    alice = venue.adapter("alice")
    before = run(alice.fetch_balances())
    with pytest.raises(InsufficientFundsError):
        run(place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "10", price=D("40000"))))
    with pytest.raises(InvalidOrderError):
        run(place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "0.0001", price=D("10"))))  # min notional
    with pytest.raises(OrderNotFoundError):
        run(alice.fetch_order(SYMBOL, client_order_id="mlt-nope"))
    with pytest.raises(InvalidOrderError, match=r"sent through account"):
        run(place(alice, intent("bob", Side.BUY, OrderType.LIMIT, "0.1", price=D("40000"))))
    assert run(alice.fetch_balances()) == before


def test_cancel_all_releases_every_reservation() -> None:
    venue, _ = make_venue()
    alice = venue.adapter("alice")
    for price in ("39000", "38000"):
        run(place(alice, intent("alice", Side.BUY, OrderType.LIMIT, "0.1", price=D(price))))
    run(place(alice, intent("alice", Side.SELL, OrderType.LIMIT, "0.5", price=D("45000"))))
    cancelled = run(alice.cancel_all_orders())
    assert len(cancelled) == 3 and all(o.status is OrderStatus.CANCELLED for o in cancelled)
    balances = run(alice.fetch_balances())
    assert balances["USDT"].locked == 0 and balances["BTC"].locked == 0
    assert balances["USDT"].free == D(100_000) and balances["BTC"].free == D(2)


def test_registry_builds_paper_adapters_on_a_given_venue() -> None:
    from meltica.adapters.registry import create_adapter
    from meltica.errors import ConfigurationError

    venue, _ = make_venue()
    adapter = create_adapter("paper", account="alice", venue=venue)
    assert adapter.account == "alice"
    assert adapter.exchange_id == "paper"
    with pytest.raises(ConfigurationError, match="needs venue"):
        create_adapter("paper", account="alice")


@pytest.mark.parametrize("side", [Side.BUY, Side.SELL])
def test_market_intent_to_new_order_is_the_dataclass_built_by_its_fields(side: Side) -> None:
    """A market intent's ``NewOrder`` (stored slot by slot, ``_market_order``) is the one ``NewOrder(...)``
    builds from the rule for every order: no price or stop, GTC, its own quantity, client order id, expiry."""
    from dataclasses import fields

    from meltica.adapters.in_process import to_new_order
    from meltica.matching import EngineOrderType, EngineTimeInForce, NewOrder

    intent = OrderIntent(
        intent_id="s:1",
        account="acct",
        strategy="s",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=OrderType.MARKET,
        quantity=D("0.25"),
        created_at=T0,
    )
    built = to_new_order(intent, "cid-1", D(100))
    expected = NewOrder(
        account="acct",
        symbol=SYMBOL,
        side=side,
        type=EngineOrderType.MARKET,
        quantity=D("0.25"),
        time_in_force=EngineTimeInForce.GTC,
        client_order_id="cid-1",
    )
    assert built == expected
    assert [getattr(built, f.name) for f in fields(NewOrder)] == [getattr(expected, f.name) for f in fields(NewOrder)]
    assert hash(built) == hash(expected)
