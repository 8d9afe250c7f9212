"""``VenueDriver``: how the execution agent moves a simulated venue's market in a lock-step replay.

The simulated venue driver (``meltica.live.simulated_driver.SimulatedVenueDriver``) drives an ``InProcessVenue``; the
emulator driver (``meltica.live.emulator_driver.EmulatorDriver``) drives the Binance emulator over its
admin API while orders go through the ccxt adapter. Both give the OMS the venue's user events before
a step returns, so the step's ``OrderUpdate``s are complete when ``VenueProgress`` is published.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from meltica.adapters.base import ExchangeAdapter
from meltica.domain import Bar


@runtime_checkable
class VenueDriver(Protocol):
    @property
    def adapter(self) -> ExchangeAdapter:
        """What the OMS sends orders to (account-bound)."""

    def now(self) -> datetime:
        """The venue's (simulated) time: the OMS, the emulation and the fills are stamped with it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def open(self, bar: Bar) -> None:
        """Move the clock to ``bar.ts`` and print the bar's open (stops the gap crosses trigger there)."""

    async def path(self, bar: Bar) -> None:
        """Run the bar's price path (open → nearer extreme → other extreme → close), move the clock to
        the bar's close and expire GTD orders."""

    async def settle(self) -> None:
        """Return once every user event the venue produced so far was handed to ``on_user_event``."""

    def untrusted(self) -> Exception | None:
        """Why what the OMS knows of the account can no longer be trusted (the user stream ended for good,
        the after-reconnect reconciliation failed), or ``None``. While it stands the execution stage refuses
        every request: it raises, so the worker stops and its restart reconciles before trading again."""
