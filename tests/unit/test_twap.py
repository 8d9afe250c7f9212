"""TWAP against the real paper venue: slicing, carry-over, limit cap, participation, cancel, kill switch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import TypeVar

from meltica.adapters.base import VenueOrder
from meltica.adapters.in_process import InProcessVenue, venue_order
from meltica.domain import OrderIntent, OrderType, Side, Trade
from meltica.execution.algos import Twap, TwapStatus
from tests.kit import ManualClock, spot_instrument

T = TypeVar("T")
SYMBOL = "BTC/USDT"
T0 = datetime(2021, 1, 8, tzinfo=UTC)
INSTRUMENT = spot_instrument(SYMBOL, step_size="0.0001", min_notional="0.01")


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


class VenueSink:
    """``submit``/``cancel`` straight to the paper venue (what the OMS does after its bookkeeping)."""

    def __init__(self, venue: InProcessVenue) -> None:
        self.adapter = venue.adapter("alice")
        self.sent: list[OrderIntent] = []

    async def submit(self, intent: OrderIntent) -> VenueOrder:
        self.sent.append(intent)
        return await self.adapter.create_order(intent, intent.client_order_id)

    async def cancel(self, client_order_id: str) -> VenueOrder:
        return await self.adapter.cancel_order(SYMBOL, client_order_id=client_order_id)


@dataclass
class Switch:
    mode: str = "off"

    @property
    def state(self) -> Switch:
        return self


def setup() -> tuple[InProcessVenue, ManualClock, VenueSink]:
    clock = ManualClock(T0)
    venue = InProcessVenue([INSTRUMENT], clock=clock)
    venue.deposit("alice", "USDT", D(1_000_000))
    venue.deposit("alice", "BTC", D(10))
    return venue, clock, VenueSink(venue)


def parent(qty: str = "1", side: Side = Side.BUY) -> OrderIntent:
    return OrderIntent(
        intent_id=f"twap-{qty}-{side}",
        account="alice",
        strategy="s",
        exchange="paper",
        symbol=SYMBOL,
        side=side,
        type=OrderType.MARKET,
        quantity=D(qty),
        created_at=T0,
    )


def trade(price: str, qty: str = "5") -> Trade:
    return Trade(exchange="paper", symbol=SYMBOL, trade_id=f"x{price}{qty}", price=D(price), quantity=D(qty), ts=T0)


def test_market_twap_sends_equal_slices_on_schedule_and_completes() -> None:
    async def body() -> None:
        venue, clock, sink = setup()
        venue.on_trade(trade("100"))
        twap = Twap(sink, parent("1"), duration=timedelta(minutes=10), slices=4, clock=clock, instrument=INSTRUMENT)
        for minute in range(11):
            clock.now = T0 + timedelta(minutes=minute)
            await twap.on_time()
        assert [s.quantity for s in twap.state.slices] == [D("0.25")] * 4
        # Due at 0, 2.5, 5, 7.5 minutes; the clock ticks each minute.
        assert [s.sent_at - T0 for s in twap.state.slices] == [timedelta(minutes=m) for m in (0, 3, 5, 8)]
        assert twap.state.status is TwapStatus.COMPLETED and twap.remaining == 0

    run(body())


def test_limit_cap_leaves_a_remainder_that_later_slices_carry() -> None:
    async def body() -> None:
        venue, clock, sink = setup()
        venue.on_trade(trade("100"))
        twap = Twap(
            sink,
            parent("0.9"),
            duration=timedelta(minutes=3),
            slices=3,
            clock=clock,
            limit_price=D("99"),
            offset_bps=D(20),
            instrument=INSTRUMENT,
        )
        await twap.on_market(trade("100"))  # slice 0: IOC at min(99, 100.2) = 99 → nothing to take at 99
        assert sink.sent[0].type is OrderType.LIMIT and sink.sent[0].price == D("99")
        assert twap.state.filled == 0
        clock.now = T0 + timedelta(minutes=1)
        venue.on_trade(trade("98"))
        await twap.on_market(trade("98"))  # slice 1: carries slice 0's 0.3 → 0.45 at min(99, 98.196)
        assert sink.sent[1].quantity == D("0.45")
        assert sink.sent[1].price == D("98.19")
        assert twap.state.filled == D("0.45")
        clock.now = T0 + timedelta(minutes=2)
        await twap.on_market(trade("98"))
        assert sink.sent[2].quantity == D("0.45")
        assert twap.state.status is TwapStatus.COMPLETED

    run(body())


def test_participation_bounds_the_slice_by_market_volume() -> None:
    async def body() -> None:
        venue, clock, sink = setup()
        venue.on_trade(trade("100"))
        twap = Twap(
            sink,
            parent("1"),
            duration=timedelta(minutes=2),
            slices=2,
            clock=clock,
            max_participation=D("0.1"),
            max_slice=D("0.3"),
            instrument=INSTRUMENT,
        )
        await twap.on_market(trade("100", "2"))  # 10% of 2 = 0.2
        assert sink.sent[0].quantity == D("0.2")
        clock.now = T0 + timedelta(minutes=1)
        venue.on_trade(trade("100", "50"))
        await twap.on_market(trade("100", "50"))  # last slice: all left, but max_slice 0.3
        assert sink.sent[1].quantity == D("0.3")
        clock.now = T0 + timedelta(minutes=3)
        await twap.on_time()
        assert twap.state.status is TwapStatus.EXPIRED and twap.remaining == D("0.5")

    run(body())


def test_cancel_and_kill_switch_stop_the_twap_and_cancel_the_working_slice() -> None:
    async def body() -> None:
        venue, clock, sink = setup()
        venue.on_trade(trade("100"))
        twap = Twap(
            sink,
            parent("1", Side.SELL),
            duration=timedelta(minutes=4),
            slices=4,
            clock=clock,
            limit_price=D("105"),
            instrument=INSTRUMENT,
        )
        await twap.on_time()  # a resting sell? IOC at 105: expires unfilled
        assert twap.state.slices[0].done
        await twap.cancel()
        clock.now = T0 + timedelta(minutes=1)
        await twap.on_time()
        assert len(sink.sent) == 1 and twap.state.status is TwapStatus.CANCELLED

        switch = Switch()
        other = Twap(
            sink,
            parent("2", Side.SELL),
            duration=timedelta(minutes=4),
            slices=4,
            clock=clock,
            instrument=INSTRUMENT,
            kill_switch=switch,
        )
        await other.on_time()
        assert other.state.filled == D("0.5")
        switch.mode = "halt"
        clock.now = T0 + timedelta(minutes=2)
        await other.on_time()
        assert other.state.status is TwapStatus.HALTED and len(other.state.slices) == 1

    run(body())


def test_order_events_update_fills() -> None:
    async def body() -> None:
        venue, clock, sink = setup()
        venue.on_trade(trade("100"))
        twap = Twap(sink, parent("1"), duration=timedelta(minutes=1), slices=1, clock=clock, instrument=INSTRUMENT)
        await twap.on_time()
        order = venue.engine.get_order("alice", SYMBOL, client_order_id=sink.sent[0].client_order_id)
        await twap.on_order_event(venue_order("paper", order))
        assert twap.state.status is TwapStatus.COMPLETED

    run(body())
