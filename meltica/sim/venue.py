"""``SimulatedVenue``: one account on an ``InProcessVenue``, as a simulation drives it.

The venue's user stream is not consumed by a task: ``SettlingInProcessAdapter`` delivers it to the owner
(``settle``: the OMS's ``on_user_event``) before each order call returns, and the owner settles after each
bar step (``step``: ``meltica.sim.step.BarStep``) — one of the interleavings a live venue allows, and the
same in a backtest and in the live pipeline's simulated venue driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from meltica.adapters.base import UserEvent, VenueOrder
from meltica.adapters.in_process import InProcessAdapter, InProcessVenue
from meltica.domain import Fill, Instrument, OrderIntent
from meltica.matching import FeeSchedule, FillModel
from meltica.sim.step import BarStep

UserEventHandler = Callable[[UserEvent], Awaitable[Any]]


class SettlingInProcessAdapter(InProcessAdapter):
    """The in-process adapter, with the venue's user stream delivered to the OMS before each call returns."""

    pump: Callable[[], Any] | None = None

    async def _pumped(self) -> None:
        if self.pump is not None:
            await self.pump()

    async def create_order(self, intent: OrderIntent, client_order_id: str) -> VenueOrder:
        order = await super().create_order(intent, client_order_id)
        await self._pumped()
        return order

    async def cancel_order(
        self, symbol: str, *, client_order_id: str | None = None, exchange_order_id: str | None = None
    ) -> VenueOrder:
        order = await super().cancel_order(symbol, client_order_id=client_order_id, exchange_order_id=exchange_order_id)
        await self._pumped()
        return order

    async def cancel_all_orders(self, symbol: str | None = None) -> list[VenueOrder]:
        orders = await super().cancel_all_orders(symbol)
        await self._pumped()
        return orders

    async def amend_order(
        self,
        symbol: str,
        *,
        client_order_id: str,
        new_client_order_id: str,
        quantity: Decimal | None = None,
        price: Decimal | None = None,
    ) -> VenueOrder:
        order = await super().amend_order(
            symbol,
            client_order_id=client_order_id,
            new_client_order_id=new_client_order_id,
            quantity=quantity,
            price=price,
        )
        await self._pumped()
        return order

    async def fetch_my_trades(self, symbol: str, since: datetime | None = None, limit: int | None = None) -> list[Fill]:
        # A venue returns its recent trades (Binance: the last 500); the whole history would make every
        # fill lookup of a long backtest O(fills so far).
        return (await super().fetch_my_trades(symbol, since, limit or 500))[-(limit or 500) :]


class SimulatedVenue:
    """A ``InProcessVenue`` with ``balances`` deposited into ``account``, its adapter, its bar step, and the
    account's user stream handed to ``on_user_event`` by ``settle``."""

    def __init__(
        self,
        instruments: Iterable[Instrument],
        *,
        clock: Callable[[], datetime],
        account: str,
        exchange_id: str,
        balances: Mapping[str, Decimal] | None = None,
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
        on_user_event: UserEventHandler | None = None,
    ) -> None:
        self.account = account
        self.venue = InProcessVenue(instruments, clock=clock, exchange_id=exchange_id, fees=fees, fill_model=fill_model)
        for asset, amount in (balances or {}).items():
            self.venue.deposit(account, asset, amount)
        self.engine = self.venue.engine
        self.step = BarStep(self.engine, self.venue.dispatch)
        self.adapter = SettlingInProcessAdapter(self.venue, account)
        self.adapter.pump = self.settle
        self.stream: asyncio.Queue[UserEvent] = asyncio.Queue()
        self.venue.user_queues[account].append(self.stream)
        self.on_user_event = on_user_event

    async def settle(self) -> None:
        """Hand every user event the venue produced so far to ``on_user_event``, in order."""
        stream = self.stream
        handler = self.on_user_event
        while not stream.empty():
            event = stream.get_nowait()
            if handler is not None:
                await handler(event)
