"""``OrderManager``: the order management system between approved intents and the venues.

Contract: ``meltica/execution/README.md``. The rules it keeps:

* **State machine.** Every change is a domain event applied with ``Order.apply`` (the transition table
  of ``meltica.domain.orders``). An event the lifecycle refuses is *recorded* — an
  ``illegal_transition`` row in ``order_events`` plus a log warning and an entry in ``anomalies`` —
  and never applied. User actions on such an order (cancel a filled order) raise the error after
  recording it; venue events never raise out of ``on_user_event`` (the stream must go on).
* **Write-ahead.** The order row and its first events are committed before ``create_order``; a cancel
  request is stored (``pending_cancel``) before ``cancel_order``; an amendment stores its replacement
  order and an ``amend_requested`` row before ``amend_order``.
* **Identity.** The client order id is ``client_order_id_for(intent.intent_id)``. ``submit`` of a known
  intent returns the stored order and sends nothing. Lifecycle events get deterministic ids
  (``accepted``, ``fill:<trade id>`` …), so a replayed event is a no-op in the database too.
* **Retries.** Only retryable errors are retried, with ``RetryPolicy`` backoff. After an ambiguous
  placement failure (timeout, lost answer, 5xx — anything retryable but a rate limit, which the venue
  refused before executing) the order is looked up by client order id first; only a venue that does
  not know it gets it again, under the same client order id. If the venue cannot be asked, the order
  stays ``pending_submit`` and the error is raised: ``recover()`` settles it later.
* **Venue events.** Order updates and fills (``on_user_event``) are idempotent: a repeated update or
  fill changes nothing. A terminal update (cancelled / expired) that reports more filled quantity than
  we have seen is held back until the missing fills arrive (fills race cancels on every venue), so a
  late fill never hits a terminal order. New fills are stored in ``fills`` (same transaction as their
  order event) and then passed to the portfolio and the risk engine, exactly once.
* **Kill switch.** ``halt`` → ``cancel_all()`` of the halted scope (subscribed when a kill switch is given,
  directly or as ``risk.kill_switch``); while halted, ``submit`` rejects. A halt is not a single attempt:
  while orders of the scope stay open (the venue refused or was down) and the halt holds, the cancels are
  repeated with back-off (``HALT_RETRY_INITIAL_S`` doubling to ``HALT_RETRY_MAX_S``), logged as critical.
* **Fail closed.** The risk engine and the portfolio are called through typed protocols (``NoRisk`` /
  ``NoPortfolio`` stand in when none is given). A hook that raises — a post-trade check, a fill the
  portfolio cannot book — halts the account on the kill switch, is logged as critical and kept in
  ``anomalies``; when the kill switch cannot be engaged (none given, or one without ``engage``) the
  error is raised.

Order types the venue lacks (``Capabilities``) go to the ``LocalOrderEmulator`` when one is given:
stored with status ``new`` and ``emulated = true``, held locally, and its triggered child intents
come back through ``submit``.

The store is synchronous (short transactions); the OMS is single-event-loop code: between two
``await`` points nothing else touches an order, and every step re-reads the current snapshot after
an ``await``, so venue events that arrive while a request is in flight are never lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypedDict, runtime_checkable

from meltica.adapters.base import Capabilities, ExchangeAdapter, UserEvent, UserEventKind, VenueOrder
from meltica.domain import (
    Fill,
    Order,
    OrderAccepted,
    OrderAmended,
    OrderCancelled,
    OrderCancelRejected,
    OrderCancelRequested,
    OrderEvent,
    OrderExpired,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderStatus,
    OrderSubmitted,
    Trade,
)
from meltica.domain.orders import parse_order_event
from meltica.errors import (
    ConfigurationError,
    DataValidationError,
    IllegalStateTransitionError,
    InvalidOrderError,
    MelticaError,
    OrderNotFoundError,
    RateLimitError,
    RetryableError,
    TerminalError,
)
from meltica.execution.awaiting import maybe_await
from meltica.execution.emulation import route
from meltica.execution.recovery import RecoveryReport, recover_orders
from meltica.execution.store import (
    AMEND_REQUESTED,
    ANOMALY,
    ILLEGAL_TRANSITION,
    NEVER_REACHED_VENUE,
    OrderStoreProtocol,
)
from meltica.retry import RetryPolicy

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]

# A halt's cancels are repeated while orders of the halted scope stay open (the venue refused or was
# down): first after HALT_RETRY_INITIAL_S, doubling up to HALT_RETRY_MAX_S between rounds.
HALT_RETRY_INITIAL_S = 0.25
HALT_RETRY_MAX_S = 10.0
RISK_PATH_FAILURE = "risk_path_failure"

# --- crash hook (tests) ----------------------------------------------------------------------

CRASH_POINT_ENV = "MELTICA_CRASH_POINT"
CRASH_EXIT_CODE = 137


def crash_point(name: str) -> None:
    """Crash-safety test hook: a no-op unless ``$MELTICA_CRASH_POINT`` equals ``name``.

    Then the process dies on the spot with ``os._exit(137)`` — no cleanup, no flushing, no
    ``finally`` — as a ``kill -9`` would. Points: ``after_store`` (the order is committed, nothing was
    sent), ``after_send`` (the venue accepted the order, its answer is not stored yet),
    ``after_cancel_request`` (``pending_cancel`` is committed, the cancel was not sent),
    ``after_cancel_send`` (the venue cancelled the order, its answer is not stored yet),
    ``after_amend_request`` (the replacement order and ``amend_requested`` are committed, the amend was
    not sent), ``after_amend_send`` (the venue amended, its answer is not stored yet),
    ``cancel_all_midway`` (one cancel of ``cancel_all`` answered and stored, the others requested —
    ``pending_cancel`` — and perhaps sent). Used by
    ``tests/integration/crash_worker.py``; never set the variable in production.
    """
    if os.environ.get(CRASH_POINT_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


# --- collaborators (structural: the real ones live in meltica.risk / portfolio / execution.emulation) --


class RiskHooks(Protocol):
    """``meltica.risk.RiskEngine`` as the OMS uses it. ``check`` returns a ``RiskDecision``
    (``approved``, ``rule``, ``reason``); the other hooks keep its open orders, positions and post-trade
    checks. Every hook is called and may raise (see *Fail closed*). Its ``kill_switch``, when it has
    one, is subscribed to."""

    def check(self, intent: OrderIntent) -> Any: ...

    def on_order_open(self, client_order_id: str, intent: OrderIntent) -> Any: ...

    def on_order_closed(self, client_order_id: str) -> Any: ...

    def on_fill(self, fill: Fill, *, account: str, strategy: str) -> Any: ...

    def on_market(self, exchange: str, symbol: str, last: Decimal) -> Any: ...


class PortfolioSink(Protocol):
    def apply_fill(self, fill: Fill, *, account: str, strategy: str) -> Any: ...


@dataclass(frozen=True)
class _Approval:
    approved: bool = True
    rule: str | None = None
    reason: str | None = None


class NoRisk:
    """The risk gate of an OMS without a risk engine: approves every intent, keeps nothing."""

    def check(self, intent: OrderIntent) -> _Approval:
        return _Approval()

    def on_order_open(self, client_order_id: str, intent: OrderIntent) -> None:
        return None

    def on_order_closed(self, client_order_id: str) -> None:
        return None

    def on_fill(self, fill: Fill, *, account: str, strategy: str) -> None:
        return None

    def on_market(self, exchange: str, symbol: str, last: Decimal) -> None:
        return None


class NoPortfolio:
    """The portfolio of an OMS without one: books nothing."""

    def apply_fill(self, fill: Fill, *, account: str, strategy: str) -> None:
        return None


class KillSwitchSource(Protocol):
    def subscribe(self, callback: Callable[[Any], Any]) -> Any: ...


@runtime_checkable
class HaltingKillSwitch(Protocol):
    """A kill switch the OMS can engage itself (``meltica.risk.KillSwitch``): used to halt when the
    risk path fails."""

    def subscribe(self, callback: Callable[[Any], Any]) -> Any: ...

    def engage(
        self,
        mode: Any,
        reason: str,
        actor: str | None = None,
        *,
        scope: str = ...,
        details: Mapping[str, object] | None = None,
    ) -> Any: ...


class OmsState(TypedDict):
    """``OrderManager.export_state``: orders as JSON ``Order``s; deferred terminal updates by client order
    id as ``[JSON order event, the venue's filled quantity]``."""

    orders: list[dict[str, Any]]
    deferred: dict[str, list[Any]]


class OrderEmulator(Protocol):
    """``meltica.execution.emulation.LocalOrderEmulator`` as the OMS uses it (methods may be async)."""

    def add(self, intent: OrderIntent, client_order_id: str) -> Any: ...

    def on_market(self, item: Any) -> Any: ...

    def on_order_event(self, order: Order) -> Any: ...


def needs_emulation(intent: OrderIntent, capabilities: Capabilities) -> bool:
    """True when the venue cannot take ``intent`` as it is and it must be held locally
    (``meltica.execution.emulation.route``: missing trigger types, absolute trailing, iceberg, GTD …)."""
    return route(intent, capabilities) == "emulated"


@dataclass(frozen=True)
class Anomaly:
    """Something the OMS refused to apply or could not explain (also stored as an order event row)."""

    ts: datetime
    kind: str
    client_order_id: str | None
    message: str


def _new_event_id() -> str:
    return uuid.uuid4().hex


class OrderManager:
    """Orders from intent to terminal state, write-ahead, idempotent. See the module docstring."""

    def __init__(
        self,
        store: OrderStoreProtocol,
        venues: Mapping[str, ExchangeAdapter],
        *,
        clock: Clock,
        risk: RiskHooks | None = None,
        portfolio: PortfolioSink | None = None,
        emulator: OrderEmulator | None = None,
        retry: RetryPolicy | None = None,
        kill_switch: KillSwitchSource | None = None,
        resend_unsent: bool = False,
        sleep: Sleep = asyncio.sleep,
        seed: int | None = None,
    ) -> None:
        self.store = store
        self.venues = dict(venues)
        self.clock = clock
        self.risk: RiskHooks = risk if risk is not None else NoRisk()
        self.portfolio: PortfolioSink = portfolio if portfolio is not None else NoPortfolio()
        self.emulator = emulator
        self.retry = retry or RetryPolicy()
        self.resend_unsent = resend_unsent
        self._sleep = sleep
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not cryptography
        self._orders: dict[str, Order] = {}
        # Terminal venue updates waiting for the fills they report: coid → (event, venue filled quantity).
        self._deferred: dict[str, tuple[OrderEvent, Decimal]] = {}
        self._sending: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.anomalies: list[Anomaly] = []
        self.kill_switch = kill_switch if kill_switch is not None else getattr(risk, "kill_switch", None)
        if self.kill_switch is not None:
            self.kill_switch.subscribe(self._on_kill_switch)

    # --- lookups -----------------------------------------------------------------------------

    def _known(self, client_order_id: str) -> Order | None:
        order = self._orders.get(client_order_id)
        if order is None:
            order = self.store.get(client_order_id)
            if order is not None:
                self._orders[client_order_id] = order
        return order

    # --- state ------------------------------------------------------------------------------------

    def export_state(self) -> OmsState:
        """What this OMS holds in memory, JSON-ready: the orders it has loaded or changed (the store has
        them too) and the terminal venue updates it defers until their fills arrive (only here)."""
        return {
            "orders": [order.model_dump(mode="json") for _, order in sorted(self._orders.items())],
            "deferred": {
                coid: [event.model_dump(mode="json"), str(filled)]
                for coid, (event, filled) in sorted(self._deferred.items())
            },
        }

    def import_state(self, data: OmsState | Mapping[str, Any]) -> None:
        """Restore what ``export_state`` returned (into an OMS over the same store)."""
        for order in data["orders"]:
            self.adopt(Order.model_validate(order))
        for coid, (event, filled) in data["deferred"].items():
            self._deferred[coid] = (parse_order_event(event), Decimal(str(filled)))

    # --- the narrow interface recovery uses (meltica.execution.recovery.RecoverableOms) -------------

    def adopt(self, order: Order) -> None:
        """Hold ``order`` as loaded from the store (recovery, before it asks the venue)."""
        self._orders[order.client_order_id] = order

    def known(self, client_order_id: str) -> Order | None:
        """The order with this client order id, from memory or the store; ``None`` when there is none."""
        return self._known(client_order_id)

    def halted(self) -> bool:
        """Whether the kill switch halts this OMS (every open order is to be cancelled)."""
        return self._halted()

    async def apply_event(self, event: OrderEvent) -> Order:
        """Store ``event`` and apply it to its order (a legal transition or an anomaly note)."""
        return await self._apply(event)

    async def locate(self, order: Order) -> VenueOrder | None:
        """The venue's view of ``order`` by client order id (retried per the policy); ``None``: unknown."""
        return await self._resolve(order)

    async def resend(self, order: Order) -> Order:
        """Send a stored order that never reached its venue, under the same client order id."""
        return await self._send(order)

    async def apply_venue_order(self, vo: VenueOrder, *, sync_fills: bool) -> Order | None:
        """Bring the stored order up to the venue's view ``vo`` (and its fills, with ``sync_fills``)."""
        return await self._apply_venue_order(vo, sync_fills=sync_fills)

    def order(self, client_order_id: str) -> Order:
        order = self._known(client_order_id)
        if order is None:
            raise OrderNotFoundError(f"no order {client_order_id}", client_order_id=client_order_id)
        return order

    def reload(self, client_order_id: str) -> Order | None:
        """Re-read one order from the store, replacing the in-memory copy: another writer (reconciliation)
        appended events to it, and acting on the stale copy would store events out of order."""
        order = self.store.get(client_order_id)
        if order is None:
            self._orders.pop(client_order_id, None)
        else:
            self._orders[client_order_id] = order
        return order

    def open_orders(
        self, account: str | None = None, strategy: str | None = None, symbol: str | None = None
    ) -> list[Order]:
        """Non-terminal orders this manager holds (``recover()`` loads the database's on start)."""
        return [
            o
            for o in self._orders.values()
            if not o.is_terminal
            and (account is None or o.account == account)
            and (strategy is None or o.intent.strategy == strategy)
            and (symbol is None or o.symbol == symbol)
        ]

    def _venue(self, account: str) -> ExchangeAdapter:
        try:
            return self.venues[account]
        except KeyError:
            raise ConfigurationError(f"no venue configured for account {account!r}", field="venues") from None

    def _halted(self, intent: OrderIntent | None = None) -> bool:
        """Halted globally, or (for ``intent``) for its account or strategy: the strictest scope wins."""
        effective = getattr(self.kill_switch, "effective", None)
        if intent is not None and callable(effective):
            mode, _scope = effective(intent.account, intent.strategy)
            return str(getattr(mode, "value", mode)) == "halt"
        state = getattr(self.kill_switch, "state", None)
        mode = getattr(state, "mode", None)
        return str(getattr(mode, "value", mode)) == "halt"

    # --- applying events ---------------------------------------------------------------------

    def _anomaly(self, order: Order | None, kind: str, message: str, payload: Mapping[str, Any]) -> None:
        now = self.clock()
        log.warning("order %s: %s: %s", order.client_order_id if order else "-", kind, message)
        self.anomalies.append(Anomaly(now, kind, order.client_order_id if order else None, message))
        if order is not None:
            self.store.record_note(order, kind, now, {"message": message, **payload})

    async def _apply(self, event: OrderEvent, *, raise_illegal: bool = False) -> Order:
        """Apply ``event`` to its order, store it, and tell the collaborators. An event the state
        machine refuses is recorded (and raised when ``raise_illegal``), never applied."""
        current = self.order(event.client_order_id)
        try:
            new = current.apply(event)
        except (IllegalStateTransitionError, DataValidationError) as exc:
            self._anomaly(
                current,
                ILLEGAL_TRANSITION,
                str(exc),
                {"event": event.model_dump(mode="json"), "reason": exc.reason, "status": current.status.value},
            )
            if isinstance(event, OrderFilled):
                await self._orphan_fill(event.fill, current.account, current.intent.strategy)
            if raise_illegal:
                raise
            return current
        if new is current:
            return current  # a replayed fill
        self.store.append_event(new, event)
        self._orders[new.client_order_id] = new
        await self._after_change(current, new, event)
        return new

    async def _after_change(self, before: Order, after: Order, event: OrderEvent) -> None:
        if isinstance(event, OrderFilled):
            await self._fill_out(event.fill, after.account, after.intent.strategy)
        if after.is_terminal and not before.is_terminal:
            self._deferred.pop(after.client_order_id, None)
            await self._risk_hook(
                "risk on_order_closed", after.account, self.risk.on_order_closed, after.client_order_id
            )
        if self.emulator is not None:
            await self._emulator_hook("on_order_event", after, account=after.account, raise_after=False)
        deferred = self._deferred.get(after.client_order_id)
        if deferred is not None and after.filled_quantity >= deferred[1]:
            del self._deferred[after.client_order_id]
            await self._apply(deferred[0])

    async def _fill_out(self, fill: Fill, account: str, strategy: str) -> None:
        what = f"fill {fill.fill_id}"
        await self._risk_hook(
            f"portfolio apply_fill ({what})",
            account,
            self.portfolio.apply_fill,
            fill,
            account=account,
            strategy=strategy,
        )
        await self._risk_hook(
            f"risk post-trade check ({what})", account, self.risk.on_fill, fill, account=account, strategy=strategy
        )

    async def _risk_hook(
        self, what: str, account: str | None, hook: Callable[..., Any], /, *args: Any, **kw: Any
    ) -> None:
        """Call a risk or portfolio hook; if it raises, halt (see *Fail closed* in the module docstring)."""
        try:
            await maybe_await(hook(*args, **kw))
        except Exception as exc:
            self._risk_path_failed(what, account, exc)

    async def _emulator_hook(
        self, method: str, *args: Any, account: str | None = None, raise_after: bool = True
    ) -> Any:
        """Call the local order emulator (methods may be async; a missing one is skipped). A failure
        fails closed: the account is halted and the failure recorded (``_risk_path_failed``), then it
        is raised — except while a venue event is applied (``raise_after=False``), which must go on."""
        fn = getattr(self.emulator, method, None) if self.emulator is not None else None
        if not callable(fn):
            return None
        try:
            return await maybe_await(fn(*args))
        except Exception as exc:
            self._risk_path_failed(f"order emulator {method}", account, exc)
            if raise_after:
                raise
            return None

    def _risk_path_failed(self, what: str, account: str | None, exc: Exception) -> None:
        """Halt the account (every account of this OMS when the failure is not one account's), loudly.
        Raises ``exc`` when no kill switch can be engaged: the failure must not pass unnoticed."""
        accounts = [account] if account is not None else sorted(self.venues)
        scopes = [f"account:{a}" for a in accounts] or ["global"]
        reason = f"{what} failed: {type(exc).__name__}: {exc}"
        log.critical("OMS: %s; halting %s", reason, ", ".join(scopes), exc_info=exc)
        self.anomalies.append(Anomaly(self.clock(), RISK_PATH_FAILURE, None, reason))
        switch = self.kill_switch
        if not isinstance(switch, HaltingKillSwitch):
            log.critical("OMS: no kill switch to engage after %s: raising", what)
            raise exc
        for scope in scopes:
            switch.engage("halt", reason, "oms", scope=scope, details={"failure": what, "error": type(exc).__name__})

    async def _orphan_fill(self, fill: Fill, account: str, strategy: str | None) -> None:
        """A fill the order cannot take (unknown order, terminal order): still a fact of the venue."""
        if self.store.record_fill(fill, account, strategy) and strategy is not None:
            await self._fill_out(fill, account, strategy)

    def _events_for(self, order: Order, vo: VenueOrder) -> tuple[list[OrderEvent], OrderEvent | None]:
        """The lifecycle events a venue snapshot implies for ``order`` (pure), and a terminal event to
        hold back until the fills the venue reports have arrived. Fills themselves come as fills."""
        coid, now = order.client_order_id, self.clock()
        terminal: OrderEvent | None = None
        if vo.status is OrderStatus.CANCELLED:
            terminal = OrderCancelled(event_id="cancelled", client_order_id=coid, ts=now, reason=vo.reason)
        elif vo.status is OrderStatus.EXPIRED:
            terminal = OrderExpired(event_id="expired", client_order_id=coid, ts=now)
        elif vo.status is OrderStatus.REJECTED:
            reason = vo.reason or "rejected by venue"
            terminal = OrderRejected(event_id="rejected", client_order_id=coid, ts=now, reason=reason)
        if order.is_terminal:
            # A stale or repeated snapshot changes nothing; a contradicting terminal one is recorded.
            if terminal is None or vo.status is order.status:
                return [], None
            return [terminal], None
        events: list[OrderEvent] = []
        if (
            vo.exchange_order_id
            and vo.status is not OrderStatus.REJECTED
            and (order.exchange_order_id is None or order.status is OrderStatus.PENDING_SUBMIT)
        ):
            events.append(
                OrderAccepted(event_id="accepted", client_order_id=coid, ts=now, exchange_order_id=vo.exchange_order_id)
            )
        if terminal is not None:
            if vo.status is not OrderStatus.REJECTED and vo.filled_quantity > order.filled_quantity:
                return events, terminal
            events.append(terminal)
        return events, None

    async def _apply_venue_order(self, vo: VenueOrder, *, sync_fills: bool, account: str | None = None) -> Order | None:
        coid = vo.client_order_id
        order = self._known(coid) if coid else None
        if order is None:
            log.info("venue update for an order we do not manage: %s %s", vo.exchange_order_id, coid)
            return None
        events, deferred = self._events_for(order, vo)
        if deferred is not None:
            self._deferred[order.client_order_id] = (deferred, vo.filled_quantity)
        for event in events:
            await self._apply(event)
        current = self.order(order.client_order_id)
        if sync_fills and vo.filled_quantity > current.filled_quantity:
            await self._sync_fills(current, vo)
        return self.order(order.client_order_id)

    async def _sync_fills(self, order: Order, vo: VenueOrder) -> int:
        """Fetch the account's trades on the symbol and apply this order's missing fills.

        No ``since``: intents carry the strategy's clock, venues their own; the venue's recent
        trades are filtered by client order id (or exchange order id) instead."""
        venue = self._venue(order.account)
        try:
            trades = await venue.fetch_my_trades(order.symbol)
        except MelticaError as exc:
            self._anomaly(order, ANOMALY, f"fills could not be fetched: {exc}", {"reason": exc.reason})
            return 0
        added = 0
        for fill in trades:
            mine = fill.client_order_id == order.client_order_id or (
                vo.exchange_order_id is not None and fill.exchange_order_id == vo.exchange_order_id
            )
            if not mine:
                continue
            if fill.client_order_id != order.client_order_id:
                fill = fill.model_copy(update={"client_order_id": order.client_order_id})
            before = self.order(order.client_order_id)
            after = await self._on_fill(fill, order.account)
            if after is not None and after is not before:
                added += 1
        current = self.order(order.client_order_id)
        if current.filled_quantity < vo.filled_quantity:
            self._anomaly(
                current,
                ANOMALY,
                f"venue reports {vo.filled_quantity} filled, its trades explain {current.filled_quantity}",
                {"venue_filled": str(vo.filled_quantity)},
            )
        return added

    async def _on_fill(self, fill: Fill, account: str | None) -> Order | None:
        order = self._known(fill.client_order_id)
        if order is None:
            log.warning("fill %s for unknown order %s", fill.fill_id, fill.client_order_id)
            self.anomalies.append(Anomaly(self.clock(), "unknown_order_fill", fill.client_order_id, fill.fill_id))
            if account is not None:
                await self._orphan_fill(fill, account, None)
            return None
        event = OrderFilled(
            event_id=f"fill:{fill.fill_id}", client_order_id=order.client_order_id, ts=fill.ts, fill=fill
        )
        return await self._apply(event)

    # --- venue events --------------------------------------------------------------------------

    async def on_user_event(self, event: UserEvent, *, account: str | None = None) -> None:
        """Apply one private-stream event. Idempotent; never raises for a venue-side inconsistency."""
        if account is None and len(self.venues) == 1:
            account = next(iter(self.venues))
        if event.kind is UserEventKind.ORDER and event.order is not None:
            await self._apply_venue_order(event.order, sync_fills=False, account=account)
        elif event.kind is UserEventKind.FILL and event.fill is not None:
            await self._on_fill(event.fill, account)
        # Balance events: the portfolio takes balances from the venue itself (set_balances).

    async def on_market_data(self, item: Any) -> None:
        if self.emulator is not None:
            await self._emulator_hook("on_market", item)
        if isinstance(item, Trade):
            await self._risk_hook(
                f"risk post-trade check (market {item.exchange} {item.symbol})",
                None,
                self.risk.on_market,
                item.exchange,
                item.symbol,
                item.price,
            )

    async def start(self) -> None:
        """Consume every venue's user stream in the background (``stop()`` ends it)."""
        for account, venue in self.venues.items():
            self._spawn(self._consume(account, venue))

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel the background readers; a reader that does not end within ``timeout`` is logged, not
        waited for forever (a venue library may swallow a cancellation)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error("background task %s did not stop within %.0f s", task.get_name(), timeout)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, account: str, venue: ExchangeAdapter) -> None:
        async for event in venue.stream_user_events():
            try:
                await self.on_user_event(event, account=account)
            except Exception as exc:
                # on_user_event records what the venue says and never raises for it: this is a bug. The
                # account halts and it is recorded; later events are still applied (they are facts).
                self._risk_path_failed("applying a user event", account, exc)

    def _on_kill_switch(self, change: Any) -> None:
        """A kill-switch change (``meltica.risk.KillSwitchChange``, or a bare state): on halt, cancel every
        open order in the halted scope (global, ``account:<name>`` or ``strategy:<name>``)."""
        current = getattr(change, "current", change)
        mode = getattr(current, "mode", current)
        if str(getattr(mode, "value", mode)) != "halt":
            return
        scope = str(getattr(change, "scope", "global"))
        kind, _, name = scope.partition(":")
        filters: dict[str, str] = {}
        if kind == "account" and name:
            filters["account"] = name
        elif kind == "strategy" and name:
            filters["strategy"] = name
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            log.error("kill switch halt outside an event loop: call OrderManager.cancel_all() yourself")
            return
        self._spawn(self._cancel_until_clear(scope, filters))

    async def _cancel_until_clear(self, scope: str, filters: Mapping[str, str]) -> None:
        """A halt is not a single attempt: cancel every open order of ``scope``, and while some stay open
        (a cancel failed: venue down, rate limit) and the scope is still halted, try again with back-off,
        saying so at CRITICAL each round. Ends when nothing of the scope is open or the halt is released."""
        reason = f"kill switch halt ({scope})"
        delay = HALT_RETRY_INITIAL_S
        rounds = 0
        while True:
            rounds += 1
            try:
                await self.cancel_all(reason=reason, **filters)
            except Exception:
                # Fails closed: the halt holds (new intents are refused) and the cancels are retried below.
                log.critical("%s: cancel round %d failed", reason, rounds, exc_info=True)
            left = self.open_orders(**filters)
            if not left:
                if rounds > 1:
                    log.warning("%s: every order cancelled after %d rounds", reason, rounds)
                return
            if not self._scope_halted(scope):
                log.warning("%s released with %d orders still open: no more halt cancels", reason, len(left))
                return
            log.critical(
                "%s: %d orders still open after cancel round %d (%s); retrying in %.2f s",
                reason,
                len(left),
                rounds,
                ", ".join(sorted(o.client_order_id for o in left)[:5]),
                delay,
            )
            await self._sleep(delay)
            delay = min(delay * 2, HALT_RETRY_MAX_S)

    def _scope_halted(self, scope: str) -> bool:
        """Whether ``scope`` is still halted; a kill switch that cannot tell counts as halted (fail closed)."""
        state_of = getattr(self.kill_switch, "state_of", None)
        state = state_of(scope) if callable(state_of) else getattr(self.kill_switch, "state", None)
        mode = getattr(state, "mode", None)
        if mode is None:
            return True
        return str(getattr(mode, "value", mode)) == "halt"

    # --- submit ------------------------------------------------------------------------------

    async def submit(
        self,
        intent: OrderIntent,
        *,
        parent_client_order_id: str | None = None,
        order_list_id: str | None = None,
        native: bool = False,
    ) -> Order:
        """Risk check → write-ahead store → venue (native) or local emulation. A known intent returns
        its stored order and sends nothing. Refusals (risk, venue) come back as a rejected order.
        ``native``: never route to the emulator (its own child orders come back this way)."""
        coid = intent.client_order_id
        existing = self._known(coid)
        if existing is not None:
            return existing
        if parent_client_order_id is None and self.emulator is not None:
            parent_of = getattr(self.emulator, "parent_of", None)
            if callable(parent_of):
                parent_client_order_id = parent_of(coid)
        venue = self._venue(intent.account)
        if intent.exchange != venue.exchange_id:
            raise ConfigurationError(
                f"intent {intent.intent_id} is for {intent.exchange}, account {intent.account} trades on "
                f"{venue.exchange_id}"
            )
        order = Order.from_intent(intent)
        refusal: str | None = None
        if self._halted(intent):
            refusal = "kill switch halt"
        else:
            decision = await maybe_await(self.risk.check(intent))
            if not decision.approved:
                refusal = f"risk: {decision.rule}: {decision.reason}"
        if refusal is None and not native and needs_emulation(intent, venue.capabilities):
            if self.emulator is None:
                refusal = f"{intent.type.value} is not supported by {venue.exchange_id} and no local emulator is set"
            else:
                if not self.store.insert_order(
                    order,
                    None,
                    emulated=True,
                    parent_client_order_id=parent_client_order_id,
                    order_list_id=order_list_id,
                ):
                    return self.order(coid)
                self._orders[coid] = order
                await self._risk_hook("risk on_order_open", intent.account, self.risk.on_order_open, coid, intent)
                if self._halted(intent):
                    return await self._refuse_unsent(coid)
                await maybe_await(self.emulator.add(intent, coid))
                return self.order(coid)
        now = self.clock()
        if refusal is not None:
            event: OrderEvent = OrderRejected(event_id="rejected", client_order_id=coid, ts=now, reason=refusal)
        else:
            event = OrderSubmitted(event_id="submitted", client_order_id=coid, ts=now)
        stored = order.apply(event)
        if not self.store.insert_order(
            stored, event, parent_client_order_id=parent_client_order_id, order_list_id=order_list_id
        ):
            return self.order(coid)  # stored meanwhile by a concurrent submit of the same intent
        self._orders[coid] = stored
        if refusal is not None:
            log.info("order %s rejected before sending: %s", coid, refusal)
            return stored
        crash_point("after_store")
        await self._risk_hook("risk on_order_open", intent.account, self.risk.on_order_open, coid, intent)
        if self._halted(intent):
            return await self._refuse_unsent(coid)
        return await self._send(stored)

    async def _refuse_unsent(self, client_order_id: str) -> Order:
        """A halt arrived between the risk check and the send (a failing risk hook engages one): the
        stored order is rejected and never sent."""
        reason = f"kill switch halt: {NEVER_REACHED_VENUE}"
        log.warning("order %s rejected before sending: %s", client_order_id, reason)
        return await self._apply(
            OrderRejected(event_id="rejected", client_order_id=client_order_id, ts=self.clock(), reason=reason)
        )

    async def submit_native(self, intent: OrderIntent) -> Order:
        """The ``submit`` callback for ``LocalOrderEmulator``: its triggered children go to the venue,
        stored write-ahead like any order, with ``parent_client_order_id`` = the emulated order."""
        return await self.submit(intent, native=True)

    async def _send(self, order: Order) -> Order:
        """Place a stored ``pending_submit`` order; ambiguous failures are resolved before re-sending."""
        coid = order.client_order_id
        venue = self._venue(order.account)
        done = self._sending[coid] = asyncio.Event()
        try:
            vo = await self._place(order, venue)
        finally:
            done.set()
            self._sending.pop(coid, None)
        if vo is None:
            return self.order(coid)
        crash_point("after_send")
        result = await self._apply_venue_order(vo, sync_fills=True)
        return result if result is not None else self.order(coid)

    async def _place(self, order: Order, venue: ExchangeAdapter) -> VenueOrder | None:
        coid = order.client_order_id
        attempt = 0
        while True:
            attempt += 1
            try:
                return await venue.create_order(order.intent, coid)
            except TerminalError as exc:
                await self._apply(
                    OrderRejected(
                        event_id="rejected", client_order_id=coid, ts=self.clock(), reason=f"{exc.reason}: {exc}"
                    )
                )
                return None
            except RetryableError as exc:
                if not isinstance(exc, RateLimitError):
                    # The venue may have executed it: ask before anything is re-sent.
                    try:
                        found = await self._resolve(order)
                    except RetryableError:
                        self._anomaly(
                            self.order(coid), ANOMALY, f"placement fate unknown after {exc.reason}", {"error": str(exc)}
                        )
                        raise exc from None
                    if found is not None:
                        return found
                wait = self.retry.wait_for(exc, attempt, self._rng)
                if wait is None:
                    if isinstance(exc, RateLimitError):  # refused before execution: certainly not placed
                        await self._apply(
                            OrderRejected(
                                event_id="rejected",
                                client_order_id=coid,
                                ts=self.clock(),
                                reason=f"{exc.reason}: {exc}",
                            )
                        )
                        return None
                    # The venue does not know it now, but our last try may still be in flight: stay
                    # pending_submit and let recover()/reconciliation settle it.
                    self._anomaly(
                        self.order(coid), ANOMALY, f"not placed after {attempt} attempts: {exc}", {"reason": exc.reason}
                    )
                    raise
                log.info("order %s: %s, retry %d in %.2fs", coid, exc.reason, attempt, wait)
                await self._sleep(wait)

    async def _resolve(self, order: Order) -> VenueOrder | None:
        """The venue's view of ``order`` by client order id; ``None`` when the venue does not know it.
        Transient lookup failures are retried; if they persist the error is raised."""
        venue = self._venue(order.account)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await venue.fetch_order(order.symbol, client_order_id=order.client_order_id)
            except OrderNotFoundError:
                return None
            except RetryableError:
                if attempt >= self.retry.resolve_attempts:
                    raise
                await self._sleep(self.retry.delay(attempt, self._rng))

    async def _wait_sending(self, client_order_id: str) -> None:
        sending = self._sending.get(client_order_id)
        if sending is not None:
            await sending.wait()

    # --- cancel ------------------------------------------------------------------------------

    def _refuse(self, order: Order, action: str) -> IllegalStateTransitionError:
        error = IllegalStateTransitionError(
            f"cannot {action} order {order.client_order_id}: it is {order.status.value}",
            current=order.status.value,
        )
        self._anomaly(order, ILLEGAL_TRANSITION, str(error), {"action": action, "status": order.status.value})
        return error

    async def cancel(self, client_order_id: str, *, reason: str | None = None) -> Order:
        """Cancel one order. Cancelling a cancelled order returns it; any other terminal order raises
        ``IllegalStateTransitionError`` (recorded). The venue's answer (incl. fills that won the race)
        decides the final state."""
        await self._wait_sending(client_order_id)
        order = self.order(client_order_id)
        if order.status is OrderStatus.CANCELLED:
            return order
        if order.is_terminal:
            raise self._refuse(order, "cancel")
        now = self.clock()
        if order.status is OrderStatus.NEW:  # held locally (emulated): nothing on the venue
            if self.emulator is not None:
                await self._emulator_hook("cancel", client_order_id, reason or "cancelled", account=order.account)
            return await self._apply(
                OrderCancelled(event_id="cancelled", client_order_id=client_order_id, ts=now, reason=reason),
                raise_illegal=True,
            )
        await self._apply(
            OrderCancelRequested(event_id=_new_event_id(), client_order_id=client_order_id, ts=now),
            raise_illegal=True,
        )
        crash_point("after_cancel_request")
        venue = self._venue(order.account)
        attempt = 0
        while True:
            attempt += 1
            try:
                vo: VenueOrder | None = await venue.cancel_order(order.symbol, client_order_id=client_order_id)
                crash_point("after_cancel_send")
                break
            except TerminalError as exc:
                # Unknown order (already done, or never arrived) or refused: what does the venue have?
                vo = await self._resolve(self.order(client_order_id))
                if vo is None:
                    return await self._apply(
                        OrderCancelled(
                            event_id="cancelled",
                            client_order_id=client_order_id,
                            ts=self.clock(),
                            reason=NEVER_REACHED_VENUE,
                        )
                    )
                if not vo.status.is_terminal:
                    await self._apply(
                        OrderCancelRejected(
                            event_id=_new_event_id(),
                            client_order_id=client_order_id,
                            ts=self.clock(),
                            reason=f"{exc.reason}: {exc}",
                        )
                    )
                break
            except RetryableError as exc:
                if not isinstance(exc, RateLimitError):
                    # The venue may have cancelled it (the answer was lost): ask before cancelling again.
                    try:
                        found = await self._resolve(self.order(client_order_id))
                    except RetryableError:
                        found = None
                    if found is not None and found.status.is_terminal:
                        vo = found
                        break
                wait = self.retry.wait_for(exc, attempt, self._rng)
                if wait is None:
                    raise  # stays pending_cancel; the user stream or recover() settles it
                await self._sleep(wait)
        assert vo is not None
        result = await self._apply_venue_order(vo, sync_fills=True)
        return result if result is not None else self.order(client_order_id)

    async def cancel_all(
        self,
        *,
        account: str | None = None,
        strategy: str | None = None,
        symbol: str | None = None,
        reason: str | None = None,
    ) -> list[Order]:
        """Cancel every open order matching the filters (all of them without filters). Failures of
        single cancels are logged and recorded; the returned list holds each order's current state."""
        targets = self.open_orders(account=account, strategy=strategy, symbol=symbol)

        async def cancel_one(client_order_id: str) -> Order:
            cancelled = await self.cancel(client_order_id, reason=reason)
            crash_point("cancel_all_midway")
            return cancelled

        results = await asyncio.gather(*(cancel_one(o.client_order_id) for o in targets), return_exceptions=True)
        out: list[Order] = []
        for order, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                self._anomaly(self.order(order.client_order_id), ANOMALY, f"cancel failed: {result}", {})
                out.append(self.order(order.client_order_id))
            else:
                out.append(result)
        await self._cancel_held_legs(account, strategy, symbol, reason)
        return out

    async def _cancel_held_legs(
        self, account: str | None, strategy: str | None, symbol: str | None, reason: str | None
    ) -> None:
        """The legs of order lists the local emulation holds (not yet on any venue, so not this manager's
        orders: a bracket's exits waiting for the entry, OCO legs waiting for their trigger) are cancelled
        with the rest — else they would fire after a halt. Their child orders, if any, are this manager's
        and were cancelled above."""
        orders_of = getattr(self.emulator, "orders", None)
        if not callable(orders_of):
            return
        for held in orders_of():
            intent = held.intent
            if (
                held.list_id is None
                or held.status.is_terminal  # a sibling's cancel may have ended it meanwhile
                or held.client_order_id in self._orders
                or (account is not None and intent.account != account)
                or (strategy is not None and intent.strategy != strategy)
                or (symbol is not None and intent.symbol != symbol)
            ):
                continue
            await self._emulator_hook("cancel", held.client_order_id, reason or "cancelled", account=intent.account)

    # --- amend -------------------------------------------------------------------------------

    def _replacement_intent(self, order: Order, price: Decimal | None, quantity: Decimal) -> OrderIntent:
        n = self.store.count_children(order.client_order_id) + 1
        data = order.intent.model_dump()
        data["intent_id"] = f"{order.intent.intent_id}~a{n}"
        if len(data["intent_id"]) > 128:
            data["intent_id"] = f"{order.client_order_id}~a{n}"
        data["quantity"] = quantity
        if price is not None:
            data["price"] = price
        if data.get("display_quantity") is not None and data["display_quantity"] >= quantity:
            data["display_quantity"] = None
        try:
            return OrderIntent.model_validate(data)
        except ValueError as exc:
            raise InvalidOrderError(f"amendment of {order.client_order_id} is not a valid order: {exc}") from None

    def refuse_amend(
        self,
        client_order_id: str,
        *,
        price: Decimal | None = None,
        quantity: Decimal | None = None,
        reason: str,
    ) -> Order:
        """An amendment refused before it reached the venue (e.g. by the risk gate): its replacement —
        the ``<intent_id>~a<n>`` order :meth:`amend` would have made, the id a requester is told will
        carry it — is stored ``rejected`` with ``reason`` as a child of the order, which is not touched.
        So a refused amend is reported like a refused submit, and the next amendment of the order gets
        the next replacement id. ``InvalidOrderError`` when the amendment is not a valid order at all."""
        order = self.order(client_order_id)
        total = quantity if quantity is not None else order.quantity
        if total <= order.filled_quantity:
            raise InvalidOrderError(f"new quantity {total} must exceed the filled {order.filled_quantity}")
        intent = self._replacement_intent(order, price, total - order.filled_quantity)
        coid = intent.client_order_id
        event = OrderRejected(event_id="rejected", client_order_id=coid, ts=self.clock(), reason=reason)
        rejected = Order.from_intent(intent).apply(event)
        if not self.store.insert_order(rejected, event, parent_client_order_id=client_order_id):
            return self.order(coid)  # recorded before (a redelivered refusal)
        self._orders[coid] = rejected
        log.warning("amend of %s refused: %s (replacement %s rejected)", client_order_id, reason, coid)
        return rejected

    async def amend(
        self, client_order_id: str, *, price: Decimal | None = None, quantity: Decimal | None = None
    ) -> Order:
        """New price and/or total quantity. The venue amends in place (same client order id: an
        ``amended`` event) or cancel-replaces: the original ends ``cancelled``, the replacement — intent
        ``<intent_id>~a<n>``, its remaining quantity, ``parent_client_order_id`` = the original — was
        stored before the call and is returned."""
        if price is None and quantity is None:
            raise InvalidOrderError("amend needs a price or a quantity")
        await self._wait_sending(client_order_id)
        order = self.order(client_order_id)
        if order.status not in (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED):
            raise self._refuse(order, "amend")
        total = quantity if quantity is not None else order.quantity
        if total <= order.filled_quantity:
            raise InvalidOrderError(f"new quantity {total} must exceed the filled {order.filled_quantity}")
        replacement_intent = self._replacement_intent(order, price, total - order.filled_quantity)
        rep_id = replacement_intent.client_order_id
        now = self.clock()
        submitted = OrderSubmitted(event_id="submitted", client_order_id=rep_id, ts=now)
        replacement = Order.from_intent(replacement_intent).apply(submitted)
        self.store.insert_order(replacement, submitted, parent_client_order_id=client_order_id)
        self._orders[rep_id] = replacement
        self.store.record_note(
            order,
            AMEND_REQUESTED,
            now,
            {"replacement": rep_id, "price": None if price is None else str(price), "quantity": str(total)},
        )
        crash_point("after_amend_request")
        venue = self._venue(order.account)
        try:
            vo = await venue.amend_order(
                order.symbol,
                client_order_id=client_order_id,
                new_client_order_id=rep_id,
                quantity=quantity,
                price=price,
            )
            crash_point("after_amend_send")
        except TerminalError as exc:
            # The venue refused the amendment: its replacement ends ``rejected`` with the venue's reason,
            # as a refused submit does, so the requester learns of it (the original is settled below).
            await self._apply(
                OrderRejected(
                    event_id="rejected", client_order_id=rep_id, ts=self.clock(), reason=f"{exc.reason}: {exc}"
                )
            )
            original = await self._resolve(self.order(client_order_id))
            if original is not None:
                await self._apply_venue_order(original, sync_fills=True)
            raise
        except RetryableError as exc:
            found = await self._resolve(replacement)
            if found is None:
                await self._drop_replacement(rep_id, f"amend failed: {exc.reason}: {exc}")
                original = await self._resolve(self.order(client_order_id))
                if original is not None:
                    await self._apply_venue_order(original, sync_fills=True)
                raise
            vo = found
        if vo.client_order_id == client_order_id:  # amended in place
            await self._drop_replacement(rep_id, "not used: amended in place")
            await self._apply(
                OrderAmended(
                    event_id=_new_event_id(),
                    client_order_id=client_order_id,
                    ts=self.clock(),
                    quantity=quantity,
                    price=price,
                ),
                raise_illegal=True,
            )
            result = await self._apply_venue_order(vo, sync_fills=True)
            return result if result is not None else self.order(client_order_id)
        # Cancel-replace: settle the original from the venue (its fills may have raced the replace).
        try:
            original_vo = await self._resolve(self.order(client_order_id))
        except RetryableError:
            original_vo = None
        if original_vo is not None:
            await self._apply_venue_order(original_vo, sync_fills=True)
        if not self.order(client_order_id).is_terminal and client_order_id not in self._deferred:
            await self._apply(
                OrderCancelled(
                    event_id="cancelled",
                    client_order_id=client_order_id,
                    ts=self.clock(),
                    reason=f"replaced by {rep_id}",
                )
            )
        await self._risk_hook(
            "risk on_order_open", replacement_intent.account, self.risk.on_order_open, rep_id, replacement_intent
        )
        result = await self._apply_venue_order(vo, sync_fills=True)
        return result if result is not None else self.order(rep_id)

    async def _drop_replacement(self, client_order_id: str, reason: str) -> None:
        await self._apply(
            OrderCancelled(event_id="cancelled", client_order_id=client_order_id, ts=self.clock(), reason=reason)
        )

    # --- recovery ----------------------------------------------------------------------------

    async def recover(self, *, resend_unsent: bool | None = None) -> RecoveryReport:
        """On start: every open or pending order of the database checked against its venue. See
        ``meltica.execution.recovery`` for the policy."""
        return await recover_orders(self, resend_unsent=self.resend_unsent if resend_unsent is None else resend_unsent)

    async def sync_order(self, client_order_id: str) -> Order:
        """Bring one order up to the venue's state now (order lookup + missing fills)."""
        order = self.order(client_order_id)
        vo = await self._resolve(order)
        if vo is None:
            return order
        result = await self._apply_venue_order(vo, sync_fills=True)
        return result if result is not None else self.order(client_order_id)
