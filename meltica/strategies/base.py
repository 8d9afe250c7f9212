"""The one strategy interface (DESIGN.md §2, §9): users subclass ``Strategy``; engines provide the context.

A strategy never talks to a venue, a database, Kafka or the wall clock. Everything it may do goes
through the ``StrategyContext`` it receives in ``__init__``: read the simulated or real clock, read its
positions and open orders, submit / amend / cancel intents, set timers, keep persisted state, log. The
backtest (``meltica.backtest.context.BacktestContext``) and the live pipeline's strategy host
(``meltica.live.strategy_host.LiveStrategyContext``, paper and live) implement the context; the strategy
code is the same in both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from meltica.domain import (
    Bar,
    Fill,
    Instrument,
    Order,
    OrderBookSnapshot,
    OrderType,
    Position,
    Side,
    TimeInForce,
    Trade,
)

OrderListKind = Literal["oco", "bracket"]


class StrategyParams(BaseModel):
    """Base of every strategy's parameter model: immutable, unknown keys refused (typos fail early)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class OrderList:
    """An order list submitted through ``StrategyContext.oco`` / ``bracket``.

    ``client_order_ids`` are in leg order: OCO ``(take_profit, stop)``; bracket ``(entry, take_profit,
    stop)``. The ids exist from the start (derived from deterministic intent ids) even for legs that the
    context holds back until the entry fills.
    """

    list_id: str
    kind: OrderListKind
    client_order_ids: tuple[str, ...]


@runtime_checkable
class StrategyContext(Protocol):
    """What a strategy can see and do. Implemented by the backtest's context and the live strategy host's.

    Ordering rules every implementation keeps (so the same strategy behaves the same everywhere):

    * Calls are synchronous for the strategy: ``submit`` returns the client order id at once; what the
      venue makes of the order arrives later through ``on_order`` / ``on_fill``, never re-entrantly
      inside the call that caused it.
    * Intent ids are ``f"{instance_id}:{seq}"`` with ``seq`` counting from 1 per instance and persisted
      with the state, so a replay reproduces the same client order ids.
    * A rejected order (risk or venue) is reported as an ``Order`` with status ``rejected`` in
      ``on_order``; only a malformed intent (a bug in the strategy) raises, with ``InvalidOrderError``.
    """

    @property
    def instance_id(self) -> str: ...

    @property
    def account(self) -> str: ...

    @property
    def exchange(self) -> str: ...

    @property
    def params(self) -> BaseModel: ...

    @property
    def state(self) -> dict[str, Any]:
        """Persisted per-strategy state (JSON-serialisable values; Decimals as strings)."""
        ...

    @property
    def log(self) -> logging.Logger: ...

    def now(self) -> datetime: ...

    def instrument(self, symbol: str) -> Instrument: ...

    def position(self, symbol: str) -> Position: ...

    def open_orders(self, symbol: str | None = None) -> list[Order]: ...

    def submit(
        self,
        *,
        symbol: str,
        side: Side,
        type: OrderType,
        quantity: Decimal,
        price: Decimal | None = None,
        trigger_price: Decimal | None = None,
        trailing_offset: Decimal | None = None,
        trailing_offset_pct: Decimal | None = None,
        activation_price: Decimal | None = None,
        display_quantity: Decimal | None = None,
        post_only: bool = False,
        reduce_only: bool = False,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_at: datetime | None = None,
    ) -> str:
        """Send one intent; returns its client order id."""
        ...

    def buy(
        self,
        symbol: str,
        quantity: Decimal,
        *,
        price: Decimal | None = None,
        type: OrderType | None = None,
        trigger_price: Decimal | None = None,
        trailing_offset: Decimal | None = None,
        trailing_offset_pct: Decimal | None = None,
        activation_price: Decimal | None = None,
        display_quantity: Decimal | None = None,
        post_only: bool = False,
        reduce_only: bool = False,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_at: datetime | None = None,
    ) -> str:
        """``type`` defaults to limit when a price is given, else market."""
        ...

    def sell(
        self,
        symbol: str,
        quantity: Decimal,
        *,
        price: Decimal | None = None,
        type: OrderType | None = None,
        trigger_price: Decimal | None = None,
        trailing_offset: Decimal | None = None,
        trailing_offset_pct: Decimal | None = None,
        activation_price: Decimal | None = None,
        display_quantity: Decimal | None = None,
        post_only: bool = False,
        reduce_only: bool = False,
        time_in_force: TimeInForce = TimeInForce.GTC,
        expire_at: datetime | None = None,
    ) -> str: ...

    def oco(
        self,
        symbol: str,
        side: Side,
        quantity: Decimal,
        *,
        take_profit_price: Decimal,
        stop_price: Decimal,
        stop_limit_price: Decimal | None = None,
        reduce_only: bool = True,
    ) -> OrderList:
        """Exit pair: a limit at ``take_profit_price`` and a stop at ``stop_price``; one fill cancels the other."""
        ...

    def bracket(
        self,
        symbol: str,
        side: Side,
        quantity: Decimal,
        *,
        entry_price: Decimal | None = None,
        take_profit_price: Decimal,
        stop_price: Decimal,
        stop_limit_price: Decimal | None = None,
    ) -> OrderList:
        """Entry (limit at ``entry_price``, market when ``None``); once it fills, an OCO of take-profit and stop
        on the opposite side for the entry's quantity."""
        ...

    def cancel(self, client_order_id: str) -> None: ...

    def cancel_all(self, symbol: str | None = None) -> None: ...

    def amend(self, client_order_id: str, *, price: Decimal | None = None, quantity: Decimal | None = None) -> str:
        """Change an open order; returns the client order id now carrying it (a new one after a cancel-replace)."""
        ...

    def set_timer(self, name: str, *, at: datetime | None = None, every: timedelta | None = None) -> None:
        """``on_timer(name, ts)`` at ``at`` (once), or every ``every`` from now (first at now + every)."""
        ...

    def cancel_timer(self, name: str) -> None: ...


class Strategy(Generic[P]):
    """Subclass this, set ``name`` and ``Params``, override the hooks you need, decorate with
    ``@register_strategy``.

    Hooks run on the context's clock, one at a time. The default ``snapshot_state`` / ``restore_state``
    persist ``ctx.state``; a strategy holding its working variables as attributes (faster in the hot
    path) overrides both and calls ``super()``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    bar_prices: ClassVar[Literal["decimal", "float"]] = "decimal"
    """How ``on_bar`` receives prices in a bar backtest (``run_backtest`` / ``run_bars`` on bars):
    ``"decimal"`` — a domain ``Bar`` (``Decimal`` prices and volume); ``"float"`` — a ``FloatBar`` (the same
    fields as floats, no ``Decimal`` and no pydantic model built per bar: a faster loop for a strategy that
    computes in floats anyway). Orders, fills, positions and the result stay ``Decimal`` either way, and
    elsewhere (event replay, paper, live) ``on_bar`` receives a ``Bar``: a strategy that declares
    ``"float"`` reads the prices through ``float(bar.close)``, which is right for both."""

    def __init__(self, params: P, ctx: StrategyContext) -> None:
        self.params = params
        self.ctx = ctx

    # --- lifecycle ----------------------------------------------------------------------------
    def on_start(self) -> None:
        """Called once before the first market data (after ``restore_state`` on a restart)."""

    def on_stop(self) -> None:
        """Called once when the run ends or the instance is stopped."""

    # --- market data --------------------------------------------------------------------------
    def on_bar(self, bar: Bar) -> None:
        """A closed bar; the clock is at ``bar.close_time``."""

    def on_trade(self, trade: Trade) -> None:
        """A public trade."""

    def on_book(self, book: OrderBookSnapshot) -> None:
        """The order book after an update."""

    # --- own orders ---------------------------------------------------------------------------
    def on_order(self, order: Order) -> None:
        """One of this strategy's orders changed (accepted, amended, cancelled, expired, rejected, filled)."""

    def on_fill(self, fill: Fill) -> None:
        """One execution of one of this strategy's orders; ``ctx.position`` already includes it."""

    def on_timer(self, name: str, ts: datetime) -> None:
        """A timer set with ``ctx.set_timer`` fired."""

    # --- persisted state ----------------------------------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        """JSON-serialisable state to persist (Decimals as strings).

        The default holds a copy of ``ctx.state`` under ``"state"``; subclasses add their own keys:
        ``return {**super().snapshot_state(), "ema": self.ema.state()}``.
        """
        return {"state": json_copy(dict(self.ctx.state))}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``snapshot_state`` returned, before ``on_start`` of a restarted instance."""
        self.ctx.state.clear()
        self.ctx.state.update(json_copy(dict(state.get("state") or {})))


def json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy through JSON: proves the value is serialisable (Decimals must already be strings)."""
    copied: dict[str, Any] = json.loads(json.dumps(value, allow_nan=False))
    return copied


def dec(value: str | None) -> Decimal | None:
    """State helper: a Decimal stored as a string back to a Decimal."""
    return None if value is None else Decimal(value)


def dstr(value: Decimal | None) -> str | None:
    """State helper: a Decimal to the string it is stored as."""
    return None if value is None else str(value)
