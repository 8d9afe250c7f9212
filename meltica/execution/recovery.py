"""Recovery on start: the database's open and pending orders checked against each venue.

For every non-terminal, non-emulated order of each configured account (oldest first), the venue is
asked by client order id (``fetch_order``; transient failures retried per ``RetryPolicy``):

================================  ==============================================================
venue answer                      action (each change is an order event; a ``recovered`` row too)
================================  ==============================================================
found, still open                 acknowledged if it was pending; missing fills recorded → ``open``
found open, was ``pending_cancel`` the cancel is sent again (it was requested before the restart) →
                                  ``cancelled`` (or what the venue answers)
found open, amendment pending     if the venue's price/quantity differ from the stored ones, the venue
(a stored, unsettled replacement) amended in place before the crash: ``amended`` to the venue's terms
found, filled meanwhile           ``fetch_my_trades`` → missing fills recorded → ``filled``
found, cancelled / expired        missing fills first, then the terminal event → ``cancelled``…
found, rejected                   ``rejected`` with the venue's reason
unknown, order was pending        policy ``resend_unsent=False`` (default): ``rejected`` with reason
(``new`` / ``pending_submit``)    "never reached venue"; ``resend_unsent=True``: sent again under the
                                  same client order id (exactly one order on the venue either way) —
                                  except an amendment's replacement (its original may still rest on
                                  the venue): always ``rejected``
unknown, order was open           left as is, reported ``missing_on_venue`` (a reconciliation matter)
venue cannot be asked             left as is, reported ``unresolved``
================================  ==============================================================

Why reject by default: the intent was decided on a market that has moved for as long as the process
was down; a strategy that still wants the trade sends a new intent. ``resend_unsent=True`` suits
callers that restart within seconds (and a ``RiskEngine`` re-checks nothing on re-send: the intent
was approved when first submitted). An amendment interrupted by a crash thus ends with one live
order: the replacement (the venue cancel-replaced: the original is found cancelled, the replacement
open), the original at the new terms (amended in place), or the original as it was (the venue never
saw the amend: the replacement is rejected and the amend is not re-sent, for the same reason).

Afterwards the venue's open orders on the recovered symbols whose client order id has Meltica's
prefix but no row are reported (``unknown_on_venue``), the local emulator restores its held orders
and the emulated orders it restored are the OMS's again (``held_locally``; one it could not restore —
its state was kept in memory — is cancelled with :data:`LOST_AT_RESTART`, ``lost_locally``, and
reported as an error), and if the kill switch is on ``halt`` every open order is cancelled.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from meltica.adapters.base import ExchangeAdapter, VenueOrder
from meltica.domain import OrderAmended, OrderCancelled, OrderEvent, OrderRejected, OrderStatus
from meltica.domain.orders import CLIENT_ORDER_ID_PREFIX, Order
from meltica.errors import MelticaError, RetryableError
from meltica.execution.awaiting import maybe_await
from meltica.execution.store import NEVER_REACHED_VENUE, RECOVERED, OrderStoreProtocol

__all__ = ["RecoverableOms", "RecoveredOrder", "RecoveryReport", "recover_orders"]


class RecoverableOms(Protocol):
    """What recovery needs of the OMS (``meltica.execution.oms.OrderManager`` is one): its public reads
    and the few state changes recovery makes. Recovery imports nothing of the OMS module."""

    @property
    def store(self) -> OrderStoreProtocol: ...

    @property
    def venues(self) -> Mapping[str, ExchangeAdapter]: ...

    @property
    def emulator(self) -> object | None: ...

    def clock(self) -> datetime: ...

    def order(self, client_order_id: str) -> Order: ...

    def known(self, client_order_id: str) -> Order | None: ...

    def adopt(self, order: Order) -> None: ...

    def halted(self) -> bool: ...

    async def apply_event(self, event: OrderEvent) -> Order: ...

    async def locate(self, order: Order) -> VenueOrder | None: ...

    async def resend(self, order: Order) -> Order: ...

    async def apply_venue_order(self, vo: VenueOrder, *, sync_fills: bool) -> Order | None: ...

    async def cancel(self, client_order_id: str, *, reason: str | None = None) -> Order: ...

    async def cancel_all(self, *, reason: str) -> Any: ...


log = logging.getLogger(__name__)

# Outcomes of one order's recovery.
OPEN = "open"
FILLED = "filled"
CANCELLED = "cancelled"
EXPIRED = "expired"
REJECTED = "rejected"
NEVER_REACHED = "never_reached_venue"
RESENT = "resent"
MISSING = "missing_on_venue"
UNRESOLVED = "unresolved"
HELD_LOCALLY = "held_locally"  # an emulated order the restored local emulation holds again
LOST_LOCALLY = "lost_locally"  # an emulated order no emulation store kept: cancelled, loudly

LOST_AT_RESTART = (
    "held by the local order emulation, whose state was not stored: lost at the restart (it was on no venue, "
    "so nothing was ever sent for it)"
)


@dataclass(frozen=True)
class RecoveredOrder:
    client_order_id: str
    account: str
    symbol: str
    before: OrderStatus
    after: OrderStatus
    outcome: str
    fills_added: int = 0
    detail: str | None = None


@dataclass
class RecoveryReport:
    started_at: datetime
    finished_at: datetime | None = None
    orders: list[RecoveredOrder] = field(default_factory=list)
    unknown_on_venue: list[VenueOrder] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def outcome(self, name: str) -> list[RecoveredOrder]:
        return [o for o in self.orders if o.outcome == name]

    @property
    def checked(self) -> int:
        return len(self.orders)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(o.outcome for o in self.orders))

    def summary(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "checked": self.checked,
            "outcomes": self.counts,
            "fills_added": sum(o.fills_added for o in self.orders),
            "unknown_on_venue": [o.client_order_id for o in self.unknown_on_venue],
            "errors": list(self.errors),
        }


_OUTCOME_BY_STATUS = {
    OrderStatus.FILLED: FILLED,
    OrderStatus.CANCELLED: CANCELLED,
    OrderStatus.EXPIRED: EXPIRED,
    OrderStatus.REJECTED: REJECTED,
}


async def _adopt_held_orders(oms: RecoverableOms, report: RecoveryReport) -> None:
    """The orders the OMS handed to its local emulation (stored ``emulated``, ``new``: on no venue) come
    back into the OMS, so that a cancel, ``cancel_all`` and a halt reach them again — when the emulation
    restored them from its store. One it did not restore (it kept its state in memory) is lost: it is
    cancelled with the reason, recorded and reported, never left looking open. Order-list legs the
    emulation keeps by itself are not the OMS's and stay with it."""
    emulator = oms.emulator
    orders_of = getattr(emulator, "orders", None)
    active: dict[str, Any] = {}
    if callable(orders_of):
        active = {o.client_order_id: o for o in orders_of()}
    for account in oms.venues:
        for order in oms.store.load_open(account):
            coid = order.client_order_id
            if order.status is not OrderStatus.NEW or not oms.store.is_emulated(coid):
                continue
            row = oms.store.order_row(coid) or {}
            managed = active.get(coid)
            if row.get("order_list_id") is not None or getattr(managed, "list_id", None) is not None:
                continue  # an order list's leg: the emulation's own (its store wrote the row), not the OMS's
            oms.adopt(order)
            if managed is not None:
                outcome, detail = HELD_LOCALLY, None
            else:
                outcome, detail = LOST_LOCALLY, LOST_AT_RESTART
                await oms.apply_event(
                    OrderCancelled(event_id="lost-at-restart", client_order_id=coid, ts=oms.clock(), reason=detail)
                )
                report.errors.append(f"{coid}: {detail}")
                log.error("recovery: %s (%s %s %s) %s", coid, account, order.symbol, order.intent.type.value, detail)
            after = oms.order(coid)
            report.orders.append(
                RecoveredOrder(coid, account, order.symbol, order.status, after.status, outcome, 0, detail)
            )
            oms.store.record_note(
                after,
                RECOVERED,
                oms.clock(),
                {"outcome": outcome, "before": order.status.value, "after": after.status.value, "detail": detail},
            )


def _is_replacement(oms: RecoverableOms, client_order_id: str) -> bool:
    """An amendment's replacement: a child of a venue order (an emulated parent's children are not)."""
    row = oms.store.order_row(client_order_id)
    parent = None if row is None else row.get("parent_client_order_id")
    return bool(parent) and not oms.store.is_emulated(str(parent))


def _pending_amendments(oms: RecoverableOms, orders: list[Order]) -> dict[str, str]:
    """Original → replacement, for each amendment a crash interrupted (its replacement is unsettled)."""
    pending: dict[str, str] = {}
    for order in orders:
        if order.status in (OrderStatus.NEW, OrderStatus.PENDING_SUBMIT) and _is_replacement(
            oms, order.client_order_id
        ):
            row = oms.store.order_row(order.client_order_id)
            assert row is not None
            pending[str(row["parent_client_order_id"])] = order.client_order_id
    return pending


async def _adopt_terms_amended_in_place(oms: RecoverableOms, coid: str, replacement: str, vo: VenueOrder) -> str | None:
    """The venue amended the order in place (same client order id) before the crash stored its answer:
    the venue's price and quantity become the order's. Returns a note for the report, or ``None``."""
    order = oms.order(coid)
    if order.status not in (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED) or vo.status.is_terminal:
        return None
    price = vo.price if vo.price is not None and order.price is not None and vo.price != order.price else None
    quantity = vo.quantity if vo.quantity != order.quantity else None
    if price is None and quantity is None:
        return None
    event = OrderAmended(
        event_id=f"amended:{replacement}", client_order_id=coid, ts=oms.clock(), price=price, quantity=quantity
    )
    await oms.apply_event(event)
    return f"amended in place on the venue before the restart (replacement {replacement} unused)"


async def recover_orders(oms: RecoverableOms, *, resend_unsent: bool) -> RecoveryReport:
    report = RecoveryReport(started_at=oms.clock())
    for account, venue in oms.venues.items():
        orders = oms.store.load_open(account, include_emulated=False)
        for order in orders:
            oms.adopt(order)
        symbols = sorted({o.symbol for o in orders})
        amending = _pending_amendments(oms, orders)
        for order in orders:
            coid = order.client_order_id
            before = order.status
            detail: str | None = None
            try:
                vo = await oms.locate(order)
            except RetryableError as exc:
                report.orders.append(
                    RecoveredOrder(coid, account, order.symbol, before, before, UNRESOLVED, detail=str(exc))
                )
                report.errors.append(f"{coid}: {exc}")
                oms.store.record_note(order, RECOVERED, oms.clock(), {"outcome": UNRESOLVED, "error": str(exc)})
                continue
            if vo is None:
                if before in (OrderStatus.NEW, OrderStatus.PENDING_SUBMIT):
                    if resend_unsent and not _is_replacement(oms, coid):
                        outcome = RESENT
                        try:
                            await oms.resend(order)
                        except MelticaError as exc:
                            detail = f"re-send failed: {exc}"
                            report.errors.append(f"{coid}: {detail}")
                    else:
                        outcome = NEVER_REACHED
                        await oms.apply_event(
                            OrderRejected(
                                event_id="rejected", client_order_id=coid, ts=oms.clock(), reason=NEVER_REACHED_VENUE
                            )
                        )
                else:
                    outcome = MISSING
                    detail = f"{before.value} locally, unknown on {venue.exchange_id}"
                    report.errors.append(f"{coid}: {detail}")
            else:
                await oms.apply_venue_order(vo, sync_fills=True)
                if coid in amending:
                    detail = await _adopt_terms_amended_in_place(oms, coid, amending[coid], vo)
                if before is OrderStatus.PENDING_CANCEL and not oms.order(coid).is_terminal:
                    # A cancel requested before the restart that the venue has not carried out: send it.
                    try:
                        await oms.cancel(coid, reason="cancel requested before restart")
                    except MelticaError as exc:
                        detail = f"cancel re-send failed: {exc}"
                        report.errors.append(f"{coid}: {detail}")
                after_order = oms.order(coid)
                outcome = _OUTCOME_BY_STATUS.get(after_order.status, OPEN)
            after = oms.order(coid)
            fills_added = len(after.fill_ids) - len(order.fill_ids)
            report.orders.append(
                RecoveredOrder(coid, account, order.symbol, before, after.status, outcome, fills_added, detail)
            )
            oms.store.record_note(
                after,
                RECOVERED,
                oms.clock(),
                {
                    "outcome": outcome,
                    "before": before.value,
                    "after": after.status.value,
                    "fills_added": fills_added,
                    "detail": detail,
                },
            )
        for symbol in symbols:
            try:
                on_venue = await venue.fetch_open_orders(symbol)
            except MelticaError as exc:
                report.errors.append(f"open orders of {account} {symbol}: {exc}")
                continue
            for vo in on_venue:
                coid_v = vo.client_order_id
                if coid_v and coid_v.startswith(CLIENT_ORDER_ID_PREFIX) and oms.known(coid_v) is None:
                    report.unknown_on_venue.append(vo)
    if oms.emulator is not None:
        restore = getattr(oms.emulator, "restore", None)
        if callable(restore):
            await maybe_await(restore())
        await _adopt_held_orders(oms, report)
    if oms.halted():
        await oms.cancel_all(reason="kill switch halt (on recovery)")
    report.finished_at = oms.clock()
    return report
