"""``IntentingContext``: what every simulated ``StrategyContext`` does the same way.

``BacktestContext`` (``meltica.backtest.context``) and the live strategy host's context
(``meltica.live.strategy_host``) build intents, order lists and timers identically (deterministic intent
ids ``f"{instance_id}:{seq}"``, venue precision applied as the OMS does, DESIGN.md §4); they differ only
in how a built intent or order list is handed on (held for the simulated venue, or published to the risk
stage). A subclass provides ``exchange``, ``_send_intent`` and ``_send_list``, and sets the attributes
declared below."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from meltica.domain import Instrument, Order, OrderIntent, OrderType, Position, Side, TimeInForce
from meltica.errors import InvalidOrderError
from meltica.sim.clock import ManualClock
from meltica.sim.executor import END_OF_DATA
from meltica.strategies.base import OrderList, OrderListKind, Strategy

__all__ = ["END_OF_DATA", "IntentingContext", "ManualClock", "Timer"]

if TYPE_CHECKING:
    from meltica.adapters.in_process import InProcessVenue


@dataclass(slots=True)
class Timer:
    due: datetime
    every: timedelta | None


class IntentingContext:
    """The shared half of a simulated ``StrategyContext``: identity, reads, intents, order lists, timers."""

    venue: InProcessVenue
    clock: ManualClock
    _account: str
    _instance_id: str
    _log: logging.Logger
    _state: dict[str, Any]
    _strategy: Strategy[Any] | None
    _seq: int
    _id_epoch: str = ""  # live: a per-incarnation namespace of intent ids (StrategyHost ``id_epoch``)
    _timers: dict[str, Timer]
    _pending: deque[Callable[[], None]]

    # --- StrategyContext: identity, clock, reads ---------------------------------------------------
    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def account(self) -> str:
        return self._account

    @property
    def exchange(self) -> str:
        raise NotImplementedError

    @property
    def params(self) -> BaseModel:
        params: BaseModel = self.strategy.params
        return params

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    @property
    def log(self) -> logging.Logger:
        return self._log

    @property
    def strategy(self) -> Strategy[Any]:
        if self._strategy is None:
            raise RuntimeError("no strategy attached")
        return self._strategy

    def attach(self, strategy: Strategy[Any]) -> None:
        """Make ``strategy`` (built on this context) the one that receives callbacks."""
        if strategy.ctx is not self:
            raise ValueError("the strategy was built on another context")
        self._strategy = strategy

    def now(self) -> datetime:
        return self.clock.now

    @property
    def id_epoch(self) -> str:
        """A per-incarnation namespace of this context's intent ids (live: ``StrategyHost.id_epoch``)."""
        return self._id_epoch

    @id_epoch.setter
    def id_epoch(self, value: str) -> None:
        self._id_epoch = value

    def schedule(self, callback: Callable[[], None]) -> None:
        """Queue a strategy callback; the driver runs the queue (never re-entrantly)."""
        self._pending.append(callback)

    def drop_scheduled(self) -> None:
        """Forget every queued callback (an instance that stopped hears nothing more)."""
        self._pending.clear()

    def instrument(self, symbol: str) -> Instrument:
        try:
            return self.venue.engine.instrument(symbol)
        except Exception:
            raise InvalidOrderError(f"unknown symbol {symbol!r} on {self.exchange}", reason="unknown_symbol") from None

    # --- timers ------------------------------------------------------------------------------------
    def set_timer(self, name: str, *, at: datetime | None = None, every: timedelta | None = None) -> None:
        if (at is None) == (every is None):
            raise ValueError("set_timer needs exactly one of at or every")
        if every is not None and every <= timedelta(0):
            raise ValueError("every must be positive")
        due = at if at is not None else self.now() + every  # type: ignore[operator]
        self._timers[name] = Timer(due=due, every=every)

    def cancel_timer(self, name: str) -> None:
        self._timers.pop(name, None)

    def _queue_due_timers(self) -> None:
        """Queue ``on_timer`` for every timer due by now, earliest first (a repeating one as often as due)."""
        if not self._timers:
            return
        now = self.now()
        while True:
            due = [(t.due, name) for name, t in self._timers.items() if t.due <= now]
            if not due:
                return
            ts, name = min(due)
            timer = self._timers[name]
            if timer.every is None:
                del self._timers[name]
            else:
                timer.due = ts + timer.every
            self._pending.append(partial(self._fire_timer, name, ts))

    def _fire_timer(self, name: str, ts: datetime) -> None:
        self.strategy.on_timer(name, ts)

    # --- intents -----------------------------------------------------------------------------------
    def _next_intent_id(self) -> str:
        self._seq += 1
        if self._id_epoch:
            return f"{self._instance_id}:{self._id_epoch}:{self._seq}"
        return f"{self._instance_id}:{self._seq}"

    def _intent(
        self,
        *,
        intent_id: str | None = None,
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
    ) -> OrderIntent:
        inst = self.instrument(symbol)
        # The venue's precision, as the OMS applies it before an order leaves the process (DESIGN.md §4).
        qty = inst.round_quantity(quantity)
        intent_id = intent_id or self._next_intent_id()
        if (
            type is OrderType.MARKET
            and price is None
            and trigger_price is None
            and trailing_offset is None
            and trailing_offset_pct is None
            and activation_price is None
            and display_quantity is None
            and not post_only
            and not reduce_only
            and time_in_force is TimeInForce.GTC
            and expire_at is None
        ):
            # A plain market order (``buy(symbol, qty)``, the common case): the same intent from its few values;
            # one ``plain_market`` refuses is validated below (the same error).
            plain = OrderIntent.plain_market(
                intent_id=intent_id,
                account=self._account,
                strategy=self._instance_id,
                exchange=self.exchange,
                symbol=symbol,
                side=side,
                quantity=qty,
                created_at=self.now(),
            )
            if plain is not None:
                return plain
        try:
            fields: dict[str, Any] = {
                "intent_id": intent_id,
                "account": self._account,
                "strategy": self._instance_id,
                "exchange": self.exchange,
                "symbol": symbol,
                "side": side,
                "type": type,
                "quantity": qty,
                "price": None if price is None else inst.round_price(price, side),
                "trigger_price": None if trigger_price is None else inst.round_price(trigger_price),
                "trailing_offset": trailing_offset,
                "trailing_offset_pct": trailing_offset_pct,
                "activation_price": None if activation_price is None else inst.round_price(activation_price),
                "display_quantity": None if display_quantity is None else inst.round_quantity(display_quantity),
                "post_only": post_only,
                "reduce_only": reduce_only,
                "time_in_force": time_in_force,
                "expire_at": expire_at,
                "created_at": self.now(),
            }
            # Values already of their validated types skip pydantic's pass (the same intent); others,
            # and anything the rules refuse, are validated (the same intent, or the same error).
            return OrderIntent.from_validated_values(fields) or OrderIntent(**fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "intent"
            value = first.get("input") if first["loc"] else None  # a rule across fields has no one value
            why = str(first["msg"]).removeprefix("Value error, ")
            shown = f"{loc}={value}" if first["loc"] else loc
            return self._invalid_intent(
                f"invalid order for {symbol} at {self.now().isoformat()}: {shown}: {why}",
                field=loc,
                value=value,
                values={
                    "intent_id": intent_id,
                    "account": self._account,
                    "strategy": self._instance_id,
                    "exchange": self.exchange,
                    "symbol": symbol,
                    "side": side,
                    "type": type,
                    "quantity": qty,
                    "price": price,
                    "trigger_price": trigger_price,
                    "trailing_offset": trailing_offset,
                    "trailing_offset_pct": trailing_offset_pct,
                    "activation_price": activation_price,
                    "display_quantity": display_quantity,
                    "post_only": post_only,
                    "reduce_only": reduce_only,
                    "time_in_force": time_in_force,
                    "expire_at": expire_at,
                    "created_at": self.now(),
                },
            )

    def _invalid_intent(self, message: str, *, field: str, value: Any, values: dict[str, Any]) -> OrderIntent:
        """A strategy asked for an order that cannot exist (a negative stop price, a zero quantity…).
        Here it is refused with ``InvalidOrderError`` (fails closed: nothing is sent); a backtest
        overrides this to record the refusal as a rejected order and carry on (``BacktestContext``)."""
        raise InvalidOrderError(message, reason="invalid_intent")

    def _send_intent(self, intent: OrderIntent) -> str:
        """Hand one new intent on (to the venue or the OMS); returns its client order id."""
        raise NotImplementedError

    def _send_list(self, kind: OrderListKind, list_id: str, legs: tuple[OrderIntent, ...]) -> OrderList:
        """Hand an order list on: OCO ``(take_profit, stop)``, bracket ``(entry, take_profit, stop)``."""
        raise NotImplementedError

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
        intent = self._intent(
            symbol=symbol,
            side=side,
            type=type,
            quantity=quantity,
            price=price,
            trigger_price=trigger_price,
            trailing_offset=trailing_offset,
            trailing_offset_pct=trailing_offset_pct,
            activation_price=activation_price,
            display_quantity=display_quantity,
            post_only=post_only,
            reduce_only=reduce_only,
            time_in_force=time_in_force,
            expire_at=expire_at,
        )
        return self._send_intent(intent)

    def buy(
        self,
        symbol: str,
        quantity: Decimal,
        *,
        price: Decimal | None = None,
        type: OrderType | None = None,
        **options: Any,
    ) -> str:
        """``type`` defaults to limit when a price is given, else market; ``options`` as for ``submit``."""
        return self._side_order(Side.BUY, symbol, quantity, price, type, options)

    def sell(
        self,
        symbol: str,
        quantity: Decimal,
        *,
        price: Decimal | None = None,
        type: OrderType | None = None,
        **options: Any,
    ) -> str:
        """``type`` defaults to limit when a price is given, else market; ``options`` as for ``submit``."""
        return self._side_order(Side.SELL, symbol, quantity, price, type, options)

    def _side_order(
        self,
        side: Side,
        symbol: str,
        quantity: Decimal,
        price: Decimal | None,
        type: OrderType | None,
        options: dict[str, Any],
    ) -> str:
        return self.submit(
            symbol=symbol,
            side=side,
            type=type or (OrderType.LIMIT if price is not None else OrderType.MARKET),
            quantity=quantity,
            price=price,
            **options,
        )

    def _exit_legs(
        self,
        symbol: str,
        side: Side,
        quantity: Decimal,
        take_profit_price: Decimal,
        stop_price: Decimal,
        stop_limit_price: Decimal | None,
        reduce_only: bool,
    ) -> tuple[OrderIntent, OrderIntent]:
        take_profit = self._intent(
            symbol=symbol,
            side=side,
            type=OrderType.LIMIT,
            quantity=quantity,
            price=take_profit_price,
            reduce_only=reduce_only,
        )
        stop = self._intent(
            symbol=symbol,
            side=side,
            type=OrderType.STOP_MARKET if stop_limit_price is None else OrderType.STOP_LIMIT,
            quantity=quantity,
            price=stop_limit_price,
            trigger_price=stop_price,
            reduce_only=reduce_only,
        )
        return take_profit, stop

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
        take_profit, stop = self._exit_legs(
            symbol, side, quantity, take_profit_price, stop_price, stop_limit_price, reduce_only
        )
        return self._send_list("oco", f"{take_profit.intent_id}:oco", (take_profit, stop))

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
        entry = self._intent(
            symbol=symbol,
            side=side,
            type=OrderType.MARKET if entry_price is None else OrderType.LIMIT,
            quantity=quantity,
            price=entry_price,
        )
        take_profit, stop = self._exit_legs(
            symbol, side.opposite, quantity, take_profit_price, stop_price, stop_limit_price, True
        )
        return self._send_list("bracket", f"{entry.intent_id}:bracket", (entry, take_profit, stop))

    def cancel(self, client_order_id: str) -> None:
        raise NotImplementedError

    def cancel_all(self, symbol: str | None = None) -> None:
        for coid in [o.client_order_id for o in self.open_orders(symbol)]:
            self.cancel(coid)  # an OCO sibling gone with an earlier cancel is a no-op

    def amend(self, client_order_id: str, *, price: Decimal | None = None, quantity: Decimal | None = None) -> str:
        raise NotImplementedError

    def position(self, symbol: str) -> Position:
        raise NotImplementedError

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        raise NotImplementedError
