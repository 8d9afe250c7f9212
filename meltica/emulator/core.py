"""What the emulator's endpoints see of it: the ``EmulatorCore`` protocol that ``EmulatorServer`` is.

The REST (``rest_market``, ``rest_trading``), WebSocket (``ws_endpoints``) and admin (``admin``) endpoints
each take the running emulator as an ``EmulatorCore``: its settings, the matching engine and the public
market, the stream hub and publisher, and its two clocks (module docstring of ``server``)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Protocol

from meltica.emulator.config import EmulatorAccount, EmulatorConfig
from meltica.emulator.faults import Faults
from meltica.emulator.market import SymbolMarket
from meltica.emulator.publishing import Publisher
from meltica.emulator.replay import BarEvent, ReplayEvent
from meltica.emulator.streams import StreamHub
from meltica.emulator.symbols import SymbolSpec
from meltica.matching import MatchingEngine
from meltica.sim.step import BarStep


class MarketTimeConflictError(Exception):
    """A request to drive market time that cannot apply in the emulator's current state (HTTP 409)."""


class EmulatorCore(Protocol):
    config: EmulatorConfig
    faults: Faults
    hub: StreamHub
    specs: dict[str, SymbolSpec]
    engine: MatchingEngine
    markets: dict[str, SymbolMarket]
    accounts: dict[str, EmulatorAccount]
    publisher: Publisher
    bar_step: BarStep
    events: list[ReplayEvent]

    def server_ms(self) -> int: ...

    def market_now(self) -> datetime: ...

    def market_ms(self) -> int: ...

    def account_for_key(self, api_key: str | None) -> EmulatorAccount:
        """The account of an API key (-2015 for an unknown key)."""
        ...

    @property
    def driven(self) -> bool:
        """Market time is set by ``/_emulator/market/*`` only."""
        ...

    def drive_to(self, ts_ms: int) -> datetime:
        """Market time := ``ts_ms`` (never backwards; ``MarketTimeConflictError``); driven from now on."""
        ...

    def print_bar(self, bar: BarEvent) -> None: ...

    async def step(self, n: int = 1) -> int: ...

    @property
    def events_left(self) -> int: ...

    def deposit(self, account: str, asset: str, amount: Decimal) -> None: ...

    def user_subscriptions(self) -> dict[str, int]: ...
