"""TWAP: a parent quantity worked in equal time slices over a duration.

``Twap(oms, intent, duration=..., slices=...)`` sends slice ``i`` at ``start + i × duration / slices``
through ``oms.submit`` (the OMS, or anything with ``submit``/``cancel`` coroutines returning ``Order``).
It is driven by its owner: ``await twap.on_time()`` whenever the clock moves (a timer in live trading,
the simulated clock in a backtest), ``await twap.on_market(item)`` with market data (participation and
reference price) and ``await twap.on_order_event(order)`` with the children's updates.

Slices:

* quantity = what is still to do (parent − filled − working) spread over the slices left, so an
  unfilled remainder is carried into the later slices; bounded by ``min_slice`` / ``max_slice`` and,
  with ``max_participation``, by that fraction of the market volume seen since the previous slice;
  rounded down to the instrument's step; a slice under the instrument's minimum is skipped (its
  quantity moves on); the last slice sends everything that is left (still within ``max_slice``).
* price: a MARKET slice without limits; with ``limit_price`` (a buy's cap / a sell's floor) and/or
  ``offset_bps`` (marketable limit at the last price ± offset), a LIMIT IOC slice at
  ``min(cap, last × (1 + offset))`` for a buy (``max(floor, last × (1 − offset))`` for a sell). No price
  known yet → the slice waits for one. What an IOC slice does not fill goes back to the remainder.
* a child still working at the next slice time is cancelled first (its unfilled part carries over).

Stops: ``cancel()`` (cancels the working child, status ``cancelled``), the kill switch (``halt`` stops
like a cancel; ``reduce_only`` stops unless the parent intent is reduce-only), or the end: after the
last slice the TWAP is ``completed`` when everything filled, else ``expired`` with what is left.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any, Protocol

from meltica.adapters.base import VenueOrder
from meltica.domain import Bar, Instrument, Order, OrderBookSnapshot, OrderIntent, OrderType, Side, TimeInForce, Trade
from meltica.errors import InvalidOrderError, MelticaError

_BPS = Decimal(10_000)


class OrderSink(Protocol):
    async def submit(self, intent: OrderIntent) -> Order | VenueOrder: ...

    async def cancel(self, client_order_id: str) -> Order | VenueOrder: ...


class TwapStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    HALTED = "halted"  # kill switch

    @property
    def is_done(self) -> bool:
        return self is not TwapStatus.RUNNING


@dataclass
class TwapSlice:
    index: int
    client_order_id: str
    quantity: Decimal
    price: Decimal | None
    sent_at: datetime
    filled: Decimal = Decimal(0)
    done: bool = False


@dataclass
class TwapState:
    status: TwapStatus = TwapStatus.RUNNING
    next_slice: int = 0  # index of the next slice to send
    slices: list[TwapSlice] = field(default_factory=list)
    volume_since_slice: Decimal = Decimal(0)
    last_price: Decimal | None = None
    reason: str | None = None

    @property
    def filled(self) -> Decimal:
        return sum((s.filled for s in self.slices), Decimal(0))

    @property
    def working(self) -> Decimal:
        return sum((s.quantity - s.filled for s in self.slices if not s.done), Decimal(0))


class Twap:
    def __init__(
        self,
        oms: OrderSink,
        intent: OrderIntent,
        *,
        duration: timedelta,
        slices: int,
        clock: Callable[[], datetime],
        start: datetime | None = None,
        limit_price: Decimal | None = None,
        offset_bps: Decimal | None = None,
        min_slice: Decimal | None = None,
        max_slice: Decimal | None = None,
        max_participation: Decimal | None = None,
        instrument: Instrument | None = None,
        kill_switch: Any | None = None,
    ) -> None:
        if slices < 1:
            raise InvalidOrderError("a TWAP needs at least one slice", reason="bad_twap")
        if duration <= timedelta(0):
            raise InvalidOrderError("a TWAP needs a positive duration", reason="bad_twap")
        if max_participation is not None and not 0 < max_participation <= 1:
            raise InvalidOrderError("max_participation is a fraction in (0, 1]", reason="bad_twap")
        if intent.type is not OrderType.MARKET and limit_price is None:
            limit_price = intent.price  # a LIMIT parent: its price is the cap / floor
        self.oms = oms
        self.intent = intent
        self.duration = duration
        self.slice_count = slices
        self.clock = clock
        self.start = start or clock()
        self.limit_price = limit_price
        self.offset_bps = offset_bps
        self.min_slice = min_slice
        self.max_slice = max_slice
        self.max_participation = max_participation
        self.instrument = instrument
        self.kill_switch = kill_switch  # anything with .state.mode ("off" | "halt" | "reduce_only")
        self.state = TwapState()
        self._by_coid: dict[str, TwapSlice] = {}

    # --- views -------------------------------------------------------------------------------

    @property
    def interval(self) -> timedelta:
        return self.duration / self.slice_count

    @property
    def remaining(self) -> Decimal:
        return self.intent.quantity - self.state.filled

    def slice_time(self, index: int) -> datetime:
        return self.start + self.interval * index

    # --- inputs --------------------------------------------------------------------------------

    async def on_market(self, item: Trade | Bar | OrderBookSnapshot) -> None:
        if item.symbol != self.intent.symbol:
            return
        if isinstance(item, Trade):
            self.state.last_price = item.price
            self.state.volume_since_slice += item.quantity
        elif isinstance(item, Bar):
            self.state.last_price = item.close
            self.state.volume_since_slice += item.volume
        else:
            level = item.best_ask if self.intent.side is Side.BUY else item.best_bid
            if level is not None:
                self.state.last_price = level.price
        await self.on_time()

    async def on_order_event(self, update: Order | VenueOrder) -> None:
        coid = update.client_order_id
        piece = self._by_coid.get(coid or "")
        if piece is None:
            return
        piece.filled = max(piece.filled, update.filled_quantity)
        if update.status.is_terminal:
            piece.done = True
        if self.state.status is TwapStatus.RUNNING and self.state.filled >= self.intent.quantity:
            self.state.status = TwapStatus.COMPLETED

    async def cancel(self, reason: str = "cancelled") -> None:
        await self._stop(TwapStatus.CANCELLED, reason)

    async def on_time(self) -> None:
        """Send every slice that is due (at most one per call: a late clock does not burst)."""
        state = self.state
        if state.status.is_done:
            return
        if self._halted():
            await self._stop(TwapStatus.HALTED, "kill switch")
            return
        now = self.clock()
        if state.next_slice >= self.slice_count:
            if not any(not s.done for s in state.slices) or now >= self.start + self.duration:
                await self._cancel_working()
                self._finish_if_done(final=True)
            return
        if now < self.slice_time(state.next_slice):
            return
        await self._cancel_working()
        if self.remaining <= 0:
            self._finish_if_done(final=True)
            return
        quantity = self._slice_quantity()
        price = self._slice_price()
        if self._needs_price() and price is None:
            return  # no reference price yet: wait for market data
        index = state.next_slice
        state.next_slice += 1
        state.volume_since_slice = Decimal(0)
        if quantity <= 0:
            return  # carried into the next slices
        child = self._child(index, quantity, price)
        piece = TwapSlice(index, child.client_order_id, quantity, price, now)
        state.slices.append(piece)
        self._by_coid[piece.client_order_id] = piece
        try:
            result = await self.oms.submit(child)
        except MelticaError as exc:
            piece.done = True
            state.reason = f"slice {index} refused: {exc}"
            return
        await self.on_order_event(result)

    # --- internals -----------------------------------------------------------------------------

    def _halted(self) -> bool:
        if self.kill_switch is None:
            return False
        mode = str(getattr(self.kill_switch.state, "mode", "off"))
        return mode == "halt" or (mode == "reduce_only" and not self.intent.reduce_only)

    async def _stop(self, status: TwapStatus, reason: str) -> None:
        if self.state.status.is_done:
            return
        self.state.status = status
        self.state.reason = reason
        await self._cancel_working()

    async def _cancel_working(self) -> None:
        for piece in self.state.slices:
            if piece.done:
                continue
            try:
                result = await self.oms.cancel(piece.client_order_id)
            except MelticaError:
                piece.done = True  # gone already; its fills come through on_order_event
                continue
            await self.on_order_event(result)
            piece.done = True

    def _finish_if_done(self, *, final: bool) -> None:
        if self.state.status.is_done:
            return
        if self.remaining <= 0:
            self.state.status = TwapStatus.COMPLETED
        elif final:
            self.state.status = TwapStatus.EXPIRED
            self.state.reason = f"{self.remaining} left unfilled at the end"

    def _slice_quantity(self) -> Decimal:
        state = self.state
        left = self.slice_count - state.next_slice
        todo = self.intent.quantity - state.filled - state.working
        quantity = todo if left <= 1 else todo / left
        if self.min_slice is not None:
            quantity = max(quantity, min(self.min_slice, todo))
        if self.max_slice is not None:
            quantity = min(quantity, self.max_slice)
        if self.max_participation is not None:
            quantity = min(quantity, state.volume_since_slice * self.max_participation)
        if self.instrument is not None:
            quantity = self.instrument.round_quantity(quantity)
            if self.instrument.min_quantity is not None and quantity < self.instrument.min_quantity:
                return Decimal(0)
        else:
            quantity = quantity.quantize(Decimal("1e-12"), rounding=ROUND_DOWN)
        return max(quantity, Decimal(0))

    def _needs_price(self) -> bool:
        return self.limit_price is not None or self.offset_bps is not None

    def _slice_price(self) -> Decimal | None:
        if not self._needs_price():
            return None
        last = self.state.last_price
        buy = self.intent.side is Side.BUY
        price: Decimal | None = None
        if self.offset_bps is not None:
            if last is None:
                return None
            factor = 1 + self.offset_bps / _BPS if buy else 1 - self.offset_bps / _BPS
            price = last * factor
        if self.limit_price is not None:
            price = (
                self.limit_price
                if price is None
                else (min(price, self.limit_price) if buy else max(price, self.limit_price))
            )
        if price is not None and self.instrument is not None:
            price = self.instrument.round_price(price, self.intent.side)
        return price

    def _child(self, index: int, quantity: Decimal, price: Decimal | None) -> OrderIntent:
        parent = self.intent
        return OrderIntent(
            intent_id=f"{parent.client_order_id}.twap{index}",
            account=parent.account,
            strategy=parent.strategy,
            exchange=parent.exchange,
            symbol=parent.symbol,
            side=parent.side,
            type=OrderType.MARKET if price is None else OrderType.LIMIT,
            quantity=quantity,
            price=price,
            reduce_only=parent.reduce_only,
            time_in_force=TimeInForce.GTC if price is None else TimeInForce.IOC,
            created_at=max(self.clock(), parent.created_at),
        )
