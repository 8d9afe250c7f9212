"""``SimulatedVenueDriver``: the ``VenueDriver`` of an account on an in-process venue (``venue: paper``).

It moves a ``meltica.sim.venue.SimulatedVenue`` — an ``InProcessVenue`` account with the backtest's own bar
step — by the pipeline's bars, on a manual clock, and hands the venue's user stream to the OMS before every
call returns (``meltica.live.venue`` tells the drivers apart).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Bar, Instrument
from meltica.live.config import PipelineConfig
from meltica.matching import FeeSchedule, FillModel
from meltica.sim.clock import ManualClock
from meltica.sim.venue import SimulatedVenue, UserEventHandler

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SimulatedVenueDriver:
    """A ``VenueDriver`` over an in-process ``InProcessVenue`` (one account), stepped as the backtest steps it
    (``meltica.sim.venue.SimulatedVenue``): the venue's user stream is handed to ``on_user_event`` before
    every call returns."""

    def __init__(
        self,
        instruments: Iterable[Instrument],
        *,
        account: str,
        exchange_id: str,
        balances: Mapping[str, Decimal] | None = None,
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
        start: datetime = EPOCH,
        on_user_event: UserEventHandler | None = None,
    ) -> None:
        self.account = account
        self.clock = ManualClock(start)
        self.simulated = SimulatedVenue(
            instruments,
            clock=self.clock,
            account=account,
            exchange_id=exchange_id,
            balances=balances,
            fees=fees,
            fill_model=fill_model,
            on_user_event=on_user_event,
        )
        self.venue = self.simulated.venue
        self.engine = self.simulated.engine

    @classmethod
    def from_config(cls, config: PipelineConfig, account: str, **kwargs: Any) -> SimulatedVenueDriver:
        settings = config.account(account)
        return cls(
            config.instruments(account),
            account=account,
            exchange_id=settings.exchange,
            balances=settings.initial_balances,
            fees=settings.fees(),
            fill_model=settings.fill_model(),
            **kwargs,
        )

    @property
    def on_user_event(self) -> UserEventHandler | None:
        return self.simulated.on_user_event

    @on_user_event.setter
    def on_user_event(self, handler: UserEventHandler | None) -> None:
        self.simulated.on_user_event = handler

    @property
    def adapter(self) -> ExchangeAdapter:
        return self.simulated.adapter

    def now(self) -> datetime:
        return self.clock.now

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def open(self, bar: Bar) -> None:
        self.clock.now = bar.ts
        self.simulated.step.open(bar.symbol, bar.open, bar.volume)
        await self.simulated.settle()

    async def path(self, bar: Bar) -> None:
        self.clock.now = bar.close_time
        step = self.simulated.step
        step.path(bar.symbol, bar.open, bar.high, bar.low, bar.close, bar.volume)
        await self.simulated.settle()
        if step.expire():
            await self.simulated.settle()

    async def settle(self) -> None:
        await self.simulated.settle()

    def untrusted(self) -> Exception | None:
        return None  # in-process: the OMS sees every event of the venue as it happens
