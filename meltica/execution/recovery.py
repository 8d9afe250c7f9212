"""Recovery on start: the database's open and pending orders checked against each venue.

For every non-terminal, non-emulated order of each configured account (oldest first), the venue is
asked by client order id (``fetch_order``; transient failures retried per ``RetryPolicy``):

================================  ==============================================================
venue answer                      action (each change is an order event; a ``recovered`` row too)
================================  ==============================================================
found, still open                 acknowledged if it was pending; missing fills recorded → ``open``
found open, was ``pending_cancel`` the cancel is sent again (it was requested before the restart) →
                                  ``cancelled`` (or what the venue answers)
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
was approved when first submitted).

Afterwards the venue's open orders on the recovered symbols whose client order id has Meltica's
prefix but no row are reported (``unknown_on_venue``), the local emulator restores its held orders,
and if the kill switch is on ``halt`` every open order is cancelled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from meltica.adapters.base import VenueOrder
from meltica.domain import OrderRejected, OrderStatus
from meltica.domain.orders import CLIENT_ORDER_ID_PREFIX
from meltica.errors import MelticaError, RetryableError
from meltica.execution.oms import NEVER_REACHED_VENUE, _maybe_await
from meltica.execution.store import RECOVERED

if TYPE_CHECKING:
    from meltica.execution.oms import OrderManager

__all__ = ["RecoveredOrder", "RecoveryReport", "recover_orders"]

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


def _is_replacement(oms: OrderManager, client_order_id: str) -> bool:
    """An amendment's replacement: a child of a venue order (an emulated parent's children are not)."""
    row = oms.store.order_row(client_order_id)
    parent = None if row is None else row.get("parent_client_order_id")
    return bool(parent) and not oms.store.is_emulated(str(parent))


async def recover_orders(oms: OrderManager, *, resend_unsent: bool) -> RecoveryReport:
    report = RecoveryReport(started_at=oms.clock())
    for account, venue in oms.venues.items():
        orders = oms.store.load_open(account, include_emulated=False)
        for order in orders:
            oms._orders[order.client_order_id] = order
        symbols = sorted({o.symbol for o in orders})
        for order in orders:
            coid = order.client_order_id
            before = order.status
            detail: str | None = None
            try:
                vo = await oms._resolve(order)
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
                            await oms._send(order)
                        except MelticaError as exc:
                            detail = f"re-send failed: {exc}"
                            report.errors.append(f"{coid}: {detail}")
                    else:
                        outcome = NEVER_REACHED
                        await oms._apply(
                            OrderRejected(
                                event_id="rejected", client_order_id=coid, ts=oms.clock(), reason=NEVER_REACHED_VENUE
                            )
                        )
                else:
                    outcome = MISSING
                    detail = f"{before.value} locally, unknown on {venue.exchange_id}"
                    report.errors.append(f"{coid}: {detail}")
            else:
                await oms._apply_venue_order(vo, sync_fills=True)
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
                if coid_v and coid_v.startswith(CLIENT_ORDER_ID_PREFIX) and oms._known(coid_v) is None:
                    report.unknown_on_venue.append(vo)
    if oms.emulator is not None:
        restore = getattr(oms.emulator, "restore", None)
        if callable(restore):
            await _maybe_await(restore())
    if oms._halted():
        await oms.cancel_all(reason="kill switch halt (on recovery)")
    report.finished_at = oms.clock()
    return report
