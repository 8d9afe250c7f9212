"""What reconciliation does about each kind of discrepancy: the configured policy.

Every discrepancy is classified twice: by ``kind`` (the five stored in ``reconciliation_discrepancies``)
and by ``case`` (what exactly disagrees). The policy maps each case to an ``Action``:

* ``adopt`` — the venue is the truth and the case is safe: append the venue's facts (order events,
  missing fills) through ``OrderStore``, so the facts stay append-only;
* ``report`` — store and list it, change nothing;
* ``halt`` — exposure Meltica cannot explain: raise the kill switch (``halt``) for the affected
  strategy (``strategy:<s>``), or for the account (``account:<a>``) when no strategy owns it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum


class DiscrepancyKind(StrEnum):
    MISSING_LOCALLY = "missing_locally"
    MISSING_ON_VENUE = "missing_on_venue"
    STATE_MISMATCH = "state_mismatch"
    QUANTITY_MISMATCH = "quantity_mismatch"
    BALANCE_DRIFT = "balance_drift"


class Action(StrEnum):
    ADOPT = "adopt"
    REPORT = "report"
    HALT = "halt"


class Case(StrEnum):
    """What exactly disagrees (the ``kind`` each case is stored as is in ``KIND_OF``)."""

    # an open order on the venue that Meltica has no record of
    ORDER_UNKNOWN_LOCALLY = "order_unknown_locally"
    # a venue trade of an order Meltica knows, not in ``fills``
    FILL_MISSING_LOCALLY = "fill_missing_locally"
    # a venue trade of an order Meltica has no record of (someone else traded the account)
    FILL_UNKNOWN_ORDER = "fill_unknown_order"
    # stored as new / pending submit, the venue never heard of it (older than the grace period)
    ORDER_NEVER_SENT = "order_never_sent"
    # accepted locally, unknown to the venue
    ORDER_MISSING_ON_VENUE = "order_missing_on_venue"
    # the venue closed the order (cancelled, expired, rejected), Meltica thinks it open
    VENUE_CLOSED = "venue_closed"
    # the venue accepted the order, Meltica still thinks it pending
    VENUE_ACCEPTED = "venue_accepted"
    # the venue has the order open (or filled more), Meltica thinks it closed
    VENUE_OPEN_LOCAL_CLOSED = "venue_open_local_closed"
    # the venue reports more filled than the trades Meltica could find explain
    FILLS_UNEXPLAINED = "fills_unexplained"
    # Meltica believes more filled than the venue reports
    OVERFILLED_LOCALLY = "overfilled_locally"
    # two or more venue orders carry one client order id (a request sent twice)
    DUPLICATE_CLIENT_ORDER_ID = "duplicate_client_order_id"
    # an asset's total differs beyond the tolerance
    BALANCE_DRIFT = "balance_drift"


KIND_OF: Mapping[Case, DiscrepancyKind] = {
    Case.ORDER_UNKNOWN_LOCALLY: DiscrepancyKind.MISSING_LOCALLY,
    Case.FILL_MISSING_LOCALLY: DiscrepancyKind.MISSING_LOCALLY,
    Case.FILL_UNKNOWN_ORDER: DiscrepancyKind.MISSING_LOCALLY,
    Case.ORDER_NEVER_SENT: DiscrepancyKind.MISSING_ON_VENUE,
    Case.ORDER_MISSING_ON_VENUE: DiscrepancyKind.MISSING_ON_VENUE,
    Case.VENUE_CLOSED: DiscrepancyKind.STATE_MISMATCH,
    Case.VENUE_ACCEPTED: DiscrepancyKind.STATE_MISMATCH,
    Case.VENUE_OPEN_LOCAL_CLOSED: DiscrepancyKind.STATE_MISMATCH,
    Case.FILLS_UNEXPLAINED: DiscrepancyKind.QUANTITY_MISMATCH,
    Case.OVERFILLED_LOCALLY: DiscrepancyKind.QUANTITY_MISMATCH,
    Case.DUPLICATE_CLIENT_ORDER_ID: DiscrepancyKind.MISSING_LOCALLY,  # the extra venue order has no row
    Case.BALANCE_DRIFT: DiscrepancyKind.BALANCE_DRIFT,
}

# Which actions make sense for a case: adoption needs a venue fact to append.
ADOPTABLE = frozenset(
    {Case.FILL_MISSING_LOCALLY, Case.FILL_UNKNOWN_ORDER, Case.ORDER_NEVER_SENT, Case.VENUE_CLOSED, Case.VENUE_ACCEPTED}
)

DEFAULT_ACTIONS: Mapping[Case, Action] = {
    Case.ORDER_UNKNOWN_LOCALLY: Action.HALT,
    Case.FILL_MISSING_LOCALLY: Action.ADOPT,
    Case.FILL_UNKNOWN_ORDER: Action.HALT,  # the fill is still recorded (a venue fact), then the halt
    Case.ORDER_NEVER_SENT: Action.ADOPT,
    Case.ORDER_MISSING_ON_VENUE: Action.REPORT,
    Case.VENUE_CLOSED: Action.ADOPT,
    Case.VENUE_ACCEPTED: Action.ADOPT,
    Case.VENUE_OPEN_LOCAL_CLOSED: Action.HALT,
    Case.FILLS_UNEXPLAINED: Action.HALT,
    Case.OVERFILLED_LOCALLY: Action.HALT,
    Case.DUPLICATE_CLIENT_ORDER_ID: Action.HALT,
    Case.BALANCE_DRIFT: Action.REPORT,
}


@dataclass(frozen=True)
class ReconcilePolicy:
    """``actions`` overrides ``DEFAULT_ACTIONS`` case by case (keys: ``Case`` or its string value).

    ``balance_tolerance`` per asset (absolute, on the total), else ``default_balance_tolerance``.
    ``symbols``: markets to check in addition to those found (stored orders and fills, positions, the
    venue's open orders, and — with ``balance_markets`` — every venue market whose base asset the account
    holds).
    ``pending_grace_s``: an order stored as new / pending submit more recently than this is left alone
    (the OMS may be sending it right now).
    """

    actions: Mapping[Case | str, Action | str] = field(default_factory=dict)
    balance_tolerance: Mapping[str, Decimal] = field(default_factory=dict)
    default_balance_tolerance: Decimal = Decimal("0.00000001")
    symbols: tuple[str, ...] = ()
    balance_markets: bool = True
    pending_grace_s: float = 60.0

    def action_for(self, case: Case) -> Action:
        configured = self.actions.get(case, self.actions.get(case.value))
        action = Action(configured) if configured is not None else DEFAULT_ACTIONS[case]
        if action is Action.ADOPT and case not in ADOPTABLE:
            raise ValueError(f"reconciliation case {case.value} cannot be adopted (use report or halt)")
        return action

    def tolerance(self, asset: str) -> Decimal:
        return self.balance_tolerance.get(asset, self.default_balance_tolerance)

    def validate(self) -> ReconcilePolicy:
        """Raise ``ValueError`` for a configuration that names an unknown case or action."""
        for key, value in self.actions.items():
            self.action_for(Case(key))
            Action(value)
        return self
