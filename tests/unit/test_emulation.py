"""Local order emulation against the real paper venue (matching engine): routing, every emulated
order type from placement to trigger to fill, OCO / bracket, GTD, restart from the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest

from meltica.adapters.base import Capabilities, VenueOrder
from meltica.adapters.in_process import IN_PROCESS_CAPABILITIES, InProcessAdapter, InProcessVenue, venue_order
from meltica.domain import (
    Bar,
    BookLevel,
    Instrument,
    MarketType,
    OrderBookSnapshot,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    Trade,
)
from meltica.execution.emulation import (
    BASIC_CAPABILITIES,
    EmulatedStatus,
    LocalOrderEmulator,
    MemoryEmulationStore,
    bar_path,
    route,
    route_list,
    trailing_stop_level,
    with_waypoints,
)
from meltica.matching import MatchResult
from tests.kit import ManualClock, spot_instrument

T = TypeVar("T")
SYMBOL = "BTC/USDT"
T0 = datetime(2021, 1, 8, tzinfo=UTC)
TRADES = Path(__file__).resolve().parents[1] / "data" / "binance" / "btcusdt-trades.parquet"
INSTRUMENT = spot_instrument(SYMBOL, min_notional="0.01")


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


_seq = iter(range(1, 10_000_000))


def intent(side: Side, kind: OrderType, qty: str = "0.01", **kw: Any) -> OrderIntent:
    return OrderIntent(
        intent_id=f"e-{next(_seq)}",
        account="alice",
        strategy="test",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=kind,
        quantity=D(qty),
        created_at=T0,
        **kw,
    )


class Rig:
    """A paper venue, its adapter, and an emulator whose callbacks are real venue calls."""

    def __init__(self, capabilities: Capabilities = BASIC_CAPABILITIES, store: MemoryEmulationStore | None = None):
        self.clock = ManualClock(T0)
        self.venue = InProcessVenue([INSTRUMENT], clock=self.clock)
        self.venue.deposit("alice", "USDT", D(1_000_000))
        self.venue.deposit("alice", "BTC", D(10))
        self.adapter: InProcessAdapter = self.venue.adapter("alice")
        self.store = store or MemoryEmulationStore()
        self.sent: list[OrderIntent] = []
        self.emulator = self.new_emulator(capabilities)

    def new_emulator(self, capabilities: Capabilities = BASIC_CAPABILITIES) -> LocalOrderEmulator:
        async def submit(child: OrderIntent) -> VenueOrder:
            self.sent.append(child)
            return await self.adapter.create_order(child, child.client_order_id)

        async def cancel(coid: str) -> VenueOrder:
            return await self.adapter.cancel_order(SYMBOL, client_order_id=coid)

        return LocalOrderEmulator(
            self.store,
            self.clock,
            submit,
            cancel,
            capabilities={"alice": capabilities},
            instruments={("paper", SYMBOL): INSTRUMENT},
        )

    async def deliver(self, result: MatchResult) -> None:
        for update in result.order_updates:
            await self.emulator.on_order_event(venue_order("paper", update.order))

    async def trade(self, price: str | D, qty: str = "1", side: Side | None = None) -> None:
        trade = Trade(
            exchange="paper",
            symbol=SYMBOL,
            trade_id=f"t{next(_seq)}",
            price=D(price),
            quantity=D(qty),
            aggressor_side=side,
            ts=self.clock.now,
        )
        await self.deliver(self.venue.on_trade(trade))
        await self.emulator.on_market(trade)

    async def bar(self, o: str, h: str, lo: str, c: str, v: str = "10") -> None:
        bar = Bar(
            exchange="paper",
            symbol=SYMBOL,
            timeframe="1m",
            ts=self.clock.now,
            open=D(o),
            high=D(h),
            low=D(lo),
            close=D(c),
            volume=D(v),
        )
        await self.deliver(self.venue.on_bar(bar))
        await self.emulator.on_market(bar)

    async def venue_order(self, coid: str) -> VenueOrder:
        return await self.adapter.fetch_order(SYMBOL, client_order_id=coid)


# --- routing -------------------------------------------------------------------------------------

BINANCE_LIKE = Capabilities(
    order_types=frozenset(OrderType),
    time_in_force=frozenset(TimeInForce),
    post_only=True,
    iceberg=True,
    trailing_stop=True,
)
SPOT = INSTRUMENT.model_copy(update={"market_type": MarketType.SPOT})
SWAP = INSTRUMENT.model_copy(update={"market_type": MarketType.SWAP})


@pytest.mark.parametrize(
    ("kind", "extra", "caps", "instrument", "expected"),
    [
        (OrderType.MARKET, {}, BASIC_CAPABILITIES, None, "native"),
        (OrderType.LIMIT, {"price": D(1)}, BASIC_CAPABILITIES, None, "native"),
        (OrderType.STOP_MARKET, {"trigger_price": D(1)}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.STOP_MARKET, {"trigger_price": D(1)}, BINANCE_LIKE, None, "native"),
        (OrderType.STOP_LIMIT, {"trigger_price": D(1), "price": D(1)}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.TAKE_PROFIT, {"trigger_price": D(1)}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.TAKE_PROFIT_LIMIT, {"trigger_price": D(1), "price": D(1)}, BINANCE_LIKE, None, "native"),
        (OrderType.TRAILING_STOP, {"trailing_offset_pct": D(1)}, BINANCE_LIKE, None, "native"),
        (OrderType.TRAILING_STOP, {"trailing_offset": D(50)}, BINANCE_LIKE, None, "emulated"),
        (OrderType.TRAILING_STOP, {"trailing_offset_pct": D(1)}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.LIMIT, {"price": D(1), "display_quantity": D("0.001")}, BINANCE_LIKE, None, "native"),
        (OrderType.LIMIT, {"price": D(1), "display_quantity": D("0.001")}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.LIMIT, {"price": D(1), "post_only": True}, BASIC_CAPABILITIES, None, "emulated"),
        (OrderType.LIMIT, {"price": D(1), "post_only": True}, BINANCE_LIKE, None, "native"),
        (OrderType.LIMIT, {"price": D(1), "reduce_only": True}, BINANCE_LIKE, None, "emulated"),
        (
            OrderType.LIMIT,
            {"price": D(1), "reduce_only": True},
            BINANCE_LIKE.__class__(**{**BINANCE_LIKE.__dict__, "reduce_only": True}),
            SPOT,
            "emulated",
        ),
        (
            OrderType.LIMIT,
            {"price": D(1), "reduce_only": True},
            BINANCE_LIKE.__class__(**{**BINANCE_LIKE.__dict__, "reduce_only": True}),
            SWAP,
            "native",
        ),
        (
            OrderType.LIMIT,
            {"price": D(1), "time_in_force": TimeInForce.GTD, "expire_at": T0 + timedelta(hours=1)},
            BINANCE_LIKE,
            SWAP,
            "native",
        ),
        (
            OrderType.LIMIT,
            {"price": D(1), "time_in_force": TimeInForce.GTD, "expire_at": T0 + timedelta(hours=1)},
            BINANCE_LIKE,
            SPOT,
            "emulated",
        ),
        (
            OrderType.LIMIT,
            {"price": D(1), "time_in_force": TimeInForce.GTD, "expire_at": T0 + timedelta(hours=1)},
            BASIC_CAPABILITIES,
            None,
            "emulated",
        ),
        (
            OrderType.STOP_MARKET,
            {"trigger_price": D(1), "time_in_force": TimeInForce.GTD, "expire_at": T0 + timedelta(hours=1)},
            BINANCE_LIKE,
            SWAP,
            "emulated",
        ),
    ],
)
def test_route(
    kind: OrderType, extra: dict[str, Any], caps: Capabilities, instrument: Instrument | None, expected: str
) -> None:
    assert route(intent(Side.SELL, kind, **extra), caps, instrument) == expected


def test_lists_are_local_unless_the_venue_has_oco() -> None:
    assert route_list("oco", BINANCE_LIKE) == "emulated"
    assert route_list("bracket", BINANCE_LIKE) == "emulated"
    assert route_list("oco", BINANCE_LIKE.__class__(**{**BINANCE_LIKE.__dict__, "oco": True})) == "native"
    assert route_list("oco", IN_PROCESS_CAPABILITIES) == "emulated"


def test_bar_path_is_the_engines_conservative_path() -> None:
    bar = Bar(
        exchange="x", symbol="s", timeframe="1m", ts=T0, open=D(100), high=D(103), low=D(99), close=D(101), volume=D(1)
    )
    assert bar_path(bar) == [D(100), D(99), D(103), D(101)]  # the low is nearer: first
    assert with_waypoints(bar_path(bar), [D("99.5"), D(102), D(500)]) == [
        D(100),
        D("99.5"),
        D(99),
        D("99.5"),
        D(102),
        D(103),
        D(102),
        D(101),
    ]


# --- single emulated orders, placement → trigger → fill -------------------------------------------


def test_stop_market_sell_triggers_on_the_first_trade_at_or_below_and_fills() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        order = await rig.emulator.add(intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95")))
        assert order.status is EmulatedStatus.PENDING and rig.sent == []
        await rig.trade("96")
        assert order.status is EmulatedStatus.PENDING
        await rig.trade("94.5")
        assert order.status is EmulatedStatus.FILLED
        assert order.triggered_price == D("94.5")
        assert [c.type for c in rig.sent] == [OrderType.MARKET]
        child = await rig.venue_order(rig.sent[0].client_order_id)
        assert child.status is OrderStatus.FILLED and child.filled_quantity == D("0.01")
        assert rig.emulator.parent_of(child.client_order_id or "") == order.client_order_id

    run(body())


def test_stop_limit_buy_places_its_limit_when_triggered_and_fills_on_a_later_trade() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        order = await rig.emulator.add(intent(Side.BUY, OrderType.STOP_LIMIT, trigger_price=D("105"), price=D("104")))
        await rig.trade("105")  # trigger: a LIMIT buy at 104 goes to the venue and rests
        assert order.status is EmulatedStatus.WORKING
        (child,) = rig.sent
        assert (child.type, child.price) == (OrderType.LIMIT, D("104"))
        await rig.trade("103.5")  # trades through the limit: it fills
        assert order.status is EmulatedStatus.FILLED

    run(body())


@pytest.mark.parametrize(
    ("side", "prices", "fires_at"), [(Side.SELL, ["100", "104", "110"], "110"), (Side.BUY, ["100", "96", "90"], "90")]
)
def test_take_profit_triggers_on_the_favourable_side(side: Side, prices: list[str], fires_at: str) -> None:
    async def body() -> None:
        rig = Rig()
        trigger = D("108") if side is Side.SELL else D("92")
        order = await rig.emulator.add(intent(side, OrderType.TAKE_PROFIT, trigger_price=trigger))
        for p in prices:
            await rig.trade(p)
        assert order.status is EmulatedStatus.FILLED
        assert order.triggered_price == D(fires_at)

    run(body())


def test_take_profit_limit_on_a_bar_fills_along_the_intrabar_path() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        order = await rig.emulator.add(
            intent(Side.SELL, OrderType.TAKE_PROFIT_LIMIT, trigger_price=D("102"), price=D("101"))
        )
        # open 100 → low 99 (nearer) → high 104 → close 103: triggers at the 102 waypoint.
        await rig.bar("100", "104", "99", "103")
        assert order.triggered_price == D("102")
        assert rig.sent[0].type is OrderType.LIMIT
        await rig.trade("103")
        assert order.status is EmulatedStatus.FILLED

    run(body())


def test_stops_on_the_book_use_the_side_they_would_trade_against() -> None:
    async def body() -> None:
        rig = Rig()
        order = await rig.emulator.add(intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95")))
        book = OrderBookSnapshot(
            exchange="paper",
            symbol=SYMBOL,
            ts=T0,
            bids=(BookLevel(price=D("95.5"), quantity=D(1)),),
            asks=(BookLevel(price=D("94.9") + 1, quantity=D(1)),),
        )
        await rig.emulator.on_market(book)
        assert order.status is EmulatedStatus.PENDING
        book2 = book.model_copy(update={"bids": (BookLevel(price=D("95"), quantity=D(1)),)})
        rig.venue.on_book(book2)
        await rig.emulator.on_market(book2)
        assert order.triggered_price == D("95")

    run(body())


# --- trailing stops on the recorded trade path -----------------------------------------------------


def recorded_trades() -> list[Trade]:
    df = pd.read_parquet(TRADES)
    return [
        Trade(
            exchange="paper",
            symbol=SYMBOL,
            trade_id=str(r.trade_id),
            price=D(str(r.price)),
            quantity=D(str(r.quantity)),
            aggressor_side=Side.SELL if r.buyer_maker == "True" else Side.BUY,
            ts=r.timestamp.to_pydatetime(),
        )
        for r in df.itertuples()
    ]


def expected_trailing_fire(
    prices: list[D], side: Side, *, offset: D | None = None, pct: D | None = None, activation: D | None = None
) -> tuple[int, D] | None:
    """Independent reference: index and price of the trade that fires a trailing stop."""
    active = False
    best = D(0)
    for i, p in enumerate(prices):
        if not active:
            if activation is None or (p <= activation if side is Side.SELL else p >= activation):
                active, best = True, p
            continue
        best = max(best, p) if side is Side.SELL else min(best, p)
        if side is Side.SELL:
            stop = best - offset if offset is not None else best * (1 - pct / 100)  # type: ignore[operator]
            if p <= stop:
                return i, p
        else:
            stop = best + offset if offset is not None else best * (1 + pct / 100)  # type: ignore[operator]
            if p >= stop:
                return i, p
    return None


@pytest.mark.parametrize(
    ("side", "params"),
    [
        (Side.SELL, {"trailing_offset": D("10")}),
        (Side.SELL, {"trailing_offset_pct": D("0.02")}),
        (Side.BUY, {"trailing_offset": D("8")}),
        (Side.BUY, {"trailing_offset_pct": D("0.015")}),
    ],
)
def test_trailing_stop_follows_the_recorded_path_and_fires_where_the_reference_says(
    side: Side, params: dict[str, D]
) -> None:
    trades = recorded_trades()
    prices = [t.price for t in trades]
    expected = expected_trailing_fire(
        prices, side, offset=params.get("trailing_offset"), pct=params.get("trailing_offset_pct")
    )
    assert expected is not None, "the recorded path must move enough to fire"

    async def body() -> None:
        rig = Rig()
        order = await rig.emulator.add(intent(side, OrderType.TRAILING_STOP, **params))
        fired_at: int | None = None
        for i, trade in enumerate(trades):
            await rig.deliver(rig.venue.on_trade(trade))
            await rig.emulator.on_market(trade)
            if order.status is not EmulatedStatus.PENDING:
                fired_at = i
                break
        assert (fired_at, order.triggered_price) == expected
        assert order.status is EmulatedStatus.FILLED
        best = max(prices[: fired_at + 1]) if side is Side.SELL else min(prices[: fired_at + 1])
        assert order.extreme == best
        assert order.stop_price() == trailing_stop_level(order.intent, best)

    run(body())


def test_trailing_stop_with_activation_starts_tracking_at_the_activation() -> None:
    trades = recorded_trades()
    prices = [t.price for t in trades]
    activation = sorted(prices)[len(prices) // 3]
    expected = expected_trailing_fire(prices, Side.SELL, offset=D("5"), activation=activation)
    assert expected is not None

    async def body() -> None:
        rig = Rig()
        order = await rig.emulator.add(
            intent(Side.SELL, OrderType.TRAILING_STOP, trailing_offset=D("5"), activation_price=activation)
        )
        for i, trade in enumerate(trades):
            await rig.emulator.on_market(trade)
            if order.status is not EmulatedStatus.PENDING:
                assert (i, order.triggered_price) == expected
                return
        raise AssertionError("never fired")

    run(body())


# --- iceberg, GTD, post-only ----------------------------------------------------------------------


def test_emulated_iceberg_shows_only_its_display_quantity_and_refills() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        order = await rig.emulator.add(
            intent(Side.BUY, OrderType.LIMIT, "0.05", price=D("99"), display_quantity=D("0.02"))
        )
        book = await rig.adapter.fetch_order_book(SYMBOL)
        ours = [lvl for lvl in book.bids if lvl.price == D("99")]
        # Synthetic market levels are not at 99.00 exactly; only our slice is.
        assert sum(lvl.quantity for lvl in ours) == D("0.02")
        await rig.trade("99.5", "1")  # above the limit: nothing
        assert order.filled == 0 and len(rig.sent) == 1
        # A print through 99 fills the visible 0.02; the market is now at 98.5, so each refill is
        # marketable and takes the venue's liquidity at once.
        await rig.trade("98.5", "0.03")
        assert order.status is EmulatedStatus.FILLED
        assert [c.quantity for c in rig.sent] == [D("0.02"), D("0.02"), D("0.01")]

    run(body())


def test_emulated_gtd_is_cancelled_at_expire_at() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        order = await rig.emulator.add(
            intent(
                Side.BUY,
                OrderType.LIMIT,
                price=D("90"),
                time_in_force=TimeInForce.GTD,
                expire_at=T0 + timedelta(minutes=5),
            )
        )
        (child,) = rig.sent
        assert child.time_in_force is TimeInForce.GTC
        rig.clock.now = T0 + timedelta(minutes=4)
        await rig.emulator.advance()
        assert order.status is EmulatedStatus.WORKING
        rig.clock.now = T0 + timedelta(minutes=5)
        await rig.trade("100")
        assert order.status is EmulatedStatus.EXPIRED
        assert (await rig.venue_order(child.client_order_id)).status is OrderStatus.CANCELLED

    run(body())


def test_untriggered_stop_with_gtd_expires_locally() -> None:
    async def body() -> None:
        rig = Rig()
        order = await rig.emulator.add(
            intent(
                Side.SELL,
                OrderType.STOP_MARKET,
                trigger_price=D(90),
                time_in_force=TimeInForce.GTD,
                expire_at=T0 + timedelta(minutes=1),
            )
        )
        rig.clock.now = T0 + timedelta(minutes=2)
        await rig.emulator.advance()
        assert order.status is EmulatedStatus.EXPIRED and rig.sent == []

    run(body())


def test_emulated_post_only_is_refused_when_it_would_take() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        taking = await rig.emulator.add(intent(Side.BUY, OrderType.LIMIT, price=D("100.5"), post_only=True))
        assert taking.status is EmulatedStatus.REJECTED and rig.sent == []
        resting = await rig.emulator.add(intent(Side.BUY, OrderType.LIMIT, price=D("99.5"), post_only=True))
        assert resting.status is EmulatedStatus.WORKING
        assert rig.sent[0].post_only is False  # the venue (as configured) has no post-only flag

    run(body())


def test_emulated_reduce_only_clamps_to_the_position() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        sent: list[OrderIntent] = []

        async def submit(child: OrderIntent) -> VenueOrder:
            sent.append(child)
            return await rig.adapter.create_order(child, child.client_order_id)

        async def cancel(coid: str) -> VenueOrder:
            return await rig.adapter.cancel_order(SYMBOL, client_order_id=coid)

        def position(_: OrderIntent) -> D:  # a long of 0.004 that our sells reduce
            sold = sum((f.quantity for f in rig.venue.engine.account_trades("alice", SYMBOL)), D(0))
            return D("0.004") - sold

        emu = LocalOrderEmulator(MemoryEmulationStore(), rig.clock, submit, cancel, position=position)
        order = await emu.add(intent(Side.SELL, OrderType.MARKET, "0.01", reduce_only=True))
        assert [c.quantity for c in sent] == [D("0.004")]
        assert sent[0].reduce_only is False
        assert order.filled == D("0.004")

    run(body())


# --- OCO and bracket ------------------------------------------------------------------------------


def test_oco_take_profit_fill_cancels_the_stop() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        tp = intent(Side.SELL, OrderType.LIMIT, price=D("105"))
        sl = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95"))
        await rig.emulator.add_list("oco", [tp, sl], "oco-1")
        assert rig.emulator.get(tp.client_order_id).mode == "native"  # a LIMIT is native everywhere
        assert rig.emulator.get(sl.client_order_id).mode == "emulated"
        await rig.trade("105.5", "0.004")  # partial fill of the take-profit: the stop goes
        assert rig.emulator.get(sl.client_order_id).status is EmulatedStatus.CANCELLED
        await rig.trade("94")  # would have triggered the stop
        assert rig.emulator.get(sl.client_order_id).triggered_at is None
        await rig.trade("106", "1")
        assert rig.emulator.get(tp.client_order_id).status is EmulatedStatus.FILLED
        assert rig.emulator.order_list("oco-1").status == "done"

    run(body())


def test_oco_stop_trigger_cancels_the_native_take_profit_on_the_venue() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        tp = intent(Side.SELL, OrderType.LIMIT, price=D("105"))
        sl = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95"))
        await rig.emulator.add_list("oco", [tp, sl], "oco-2")
        await rig.trade("94.9")
        assert rig.emulator.get(sl.client_order_id).status is EmulatedStatus.FILLED
        assert (await rig.venue_order(tp.client_order_id)).status is OrderStatus.CANCELLED
        assert rig.emulator.order_list("oco-2").status == "done"

    run(body())


def test_bracket_entry_then_exits_then_partial_take_profit_reduces_the_stop() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        entry = intent(Side.BUY, OrderType.LIMIT, "0.01", price=D("99"))
        tp = intent(Side.SELL, OrderType.LIMIT, "0.01", price=D("103"))
        sl = intent(Side.SELL, OrderType.STOP_LIMIT, "0.01", trigger_price=D("96"), price=D("95"))
        await rig.emulator.add_list("bracket", [entry, tp, sl], "br-1")
        emu = rig.emulator
        assert emu.get(tp.client_order_id).status is EmulatedStatus.HELD
        assert [c.client_order_id for c in rig.sent] == [entry.client_order_id]
        await rig.trade("98", "1")  # entry fills
        assert emu.get(entry.client_order_id).status is EmulatedStatus.FILLED
        assert emu.get(tp.client_order_id).status is EmulatedStatus.WORKING  # native LIMIT placed
        assert emu.get(sl.client_order_id).status is EmulatedStatus.PENDING  # emulated stop-limit
        await rig.trade("103.5", "0.004")  # take-profit partly filled
        assert emu.get(sl.client_order_id).quantity == D("0.006")
        await rig.trade("96")  # stop triggers for what is left
        assert rig.sent[-1].quantity == D("0.006") and rig.sent[-1].price == D("95")
        # The take-profit was not cancelled by the trigger: both may work until one completes.
        await rig.trade("94", "1")
        assert emu.get(sl.client_order_id).status is EmulatedStatus.FILLED
        assert emu.get(tp.client_order_id).status is EmulatedStatus.CANCELLED
        assert (await rig.venue_order(tp.client_order_id)).status is OrderStatus.CANCELLED
        assert emu.order_list("br-1").status == "done"

    run(body())


def test_bracket_with_native_stop_reduces_it_by_cancel_and_replace() -> None:
    async def body() -> None:
        rig = Rig(IN_PROCESS_CAPABILITIES)
        await rig.trade("100")
        entry = intent(Side.BUY, OrderType.MARKET, "0.01")
        tp = intent(Side.SELL, OrderType.LIMIT, "0.01", price=D("103"))
        sl = intent(Side.SELL, OrderType.STOP_LIMIT, "0.01", trigger_price=D("96"), price=D("95"))
        await rig.emulator.add_list("bracket", [entry, tp, sl], "br-2")
        emu = rig.emulator
        assert emu.get(sl.client_order_id).mode == "native"
        assert (await rig.venue_order(sl.client_order_id)).status is OrderStatus.OPEN
        await rig.trade("103.5", "0.004")
        assert (await rig.venue_order(sl.client_order_id)).status is OrderStatus.CANCELLED
        replacement = rig.sent[-1]
        assert replacement.type is OrderType.STOP_LIMIT and replacement.quantity == D("0.006")
        assert (await rig.venue_order(replacement.client_order_id)).status is OrderStatus.OPEN

    run(body())


def test_bracket_entry_cancelled_unfilled_cancels_the_list() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        entry = intent(Side.BUY, OrderType.LIMIT, price=D("90"))
        tp = intent(Side.SELL, OrderType.LIMIT, price=D("103"))
        sl = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("85"))
        await rig.emulator.add_list("bracket", [entry, tp, sl], "br-3")
        await rig.emulator.cancel(entry.client_order_id)
        assert rig.emulator.get(sl.client_order_id).status is EmulatedStatus.CANCELLED
        assert rig.emulator.order_list("br-3").status == "done"
        assert len(rig.sent) == 1

    run(body())


# --- restart ---------------------------------------------------------------------------------------


def test_restore_continues_a_trailing_stop_from_its_saved_peak() -> None:
    async def body() -> None:
        rig = Rig()
        order = await rig.emulator.add(intent(Side.SELL, OrderType.TRAILING_STOP, trailing_offset=D("5")))
        for p in ["100", "108", "104"]:
            await rig.trade(p)
        assert order.extreme == D("108")
        # The process dies; a new emulator restores from the same store.
        rig.emulator = rig.new_emulator()
        assert rig.emulator.restore() == 1
        restored = rig.emulator.get(order.client_order_id)
        assert (restored.extreme, restored.activated) == (D("108"), True)
        await rig.trade("103.5")
        assert restored.status is EmulatedStatus.PENDING
        await rig.trade("103")  # 108 − 5
        assert restored.status is EmulatedStatus.FILLED and restored.triggered_price == D("103")

    run(body())


def test_restore_keeps_the_oco_and_its_children() -> None:
    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        tp = intent(Side.SELL, OrderType.LIMIT, price=D("105"))
        sl = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95"))
        await rig.emulator.add_list("oco", [tp, sl], "oco-r")
        rig.emulator = rig.new_emulator()
        assert rig.emulator.restore() == 2
        await rig.trade("94")
        assert rig.emulator.get(sl.client_order_id).status is EmulatedStatus.FILLED
        assert (await rig.venue_order(tp.client_order_id)).status is OrderStatus.CANCELLED

    run(body())


# --- through the OrderManager ----------------------------------------------------------------------


def test_end_to_end_through_the_order_manager() -> None:
    # Imported, not importorskip'd: a broken import of our own OMS must fail this test, not skip it.
    import meltica.execution.oms as oms_module
    import meltica.execution.store as store_module

    async def body() -> None:
        rig = Rig()
        await rig.trade("100")
        emu_ref: list[LocalOrderEmulator] = []

        async def submit(child: OrderIntent) -> Any:
            return await oms.submit(child, parent_client_order_id=emu_ref[0].parent_of(child.client_order_id))

        async def cancel(coid: str) -> Any:
            return await oms.cancel(coid)

        emulator = LocalOrderEmulator(
            MemoryEmulationStore(), rig.clock, submit, cancel, capabilities={"alice": BASIC_CAPABILITIES}
        )
        emu_ref.append(emulator)

        class BasicVenue:  # the paper venue seen as a venue without stops
            def __getattr__(self, name: str) -> Any:
                return getattr(rig.adapter, name)

            @property
            def capabilities(self) -> Capabilities:
                return BASIC_CAPABILITIES

        oms = oms_module.OrderManager(
            store_module.MemoryOrderStore(), {"alice": BasicVenue()}, clock=rig.clock, emulator=emulator
        )
        stop = intent(Side.SELL, OrderType.STOP_MARKET, trigger_price=D("95"))
        await oms.submit(stop)
        assert emulator.get(stop.client_order_id).status is EmulatedStatus.PENDING
        trade = Trade(exchange="paper", symbol=SYMBOL, trade_id="oms-1", price=D("94"), quantity=D(1), ts=T0)
        rig.venue.on_trade(trade)
        await oms.on_market_data(trade)
        parent = emulator.get(stop.client_order_id)
        assert parent.status is EmulatedStatus.FILLED
        child = oms.order(parent.children[0].client_order_id)
        assert child.status is OrderStatus.FILLED

    run(body())
