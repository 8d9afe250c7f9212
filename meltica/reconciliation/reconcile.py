"""Compare what Meltica believes about one account with what its venue reports, and act on it.

``reconcile_account`` runs these checks, in this order, against a *connected* ``ExchangeAdapter``:

0. scope — the venue's balances and its open orders on *every* symbol (``fetch_open_orders(None)``;
   per symbol where the venue insists on one) are fetched first; the symbols checked are those of the
   account's stored orders and fills, its positions (the given ``Portfolio``, the latest position
   snapshots), the venue's open orders, every venue market whose base asset the account holds, and
   ``policy.symbols``;
1. trades — per symbol, every venue trade *leg* (trade id and side: both legs of a self-trade are
   fills, one per order) not known locally (neither in ``fills`` nor among its order's fill ids): a
   leg of a known order is a missed fill (adopted: an ``OrderFilled`` event appended through
   ``OrderStore``, with the OMS's own event id, so a later replay by the OMS is a no-op); a leg of no
   known order — or of a second venue order that reuses a known client order id — is unexplained
   exposure (recorded as an orphan fill, a venue fact, and halted);
2. orders — every locally open order (non-emulated) is fetched by client order id: status and filled
   quantity are compared; the venue's open orders that Meltica has no record of (or thinks closed)
   are unexplained exposure;
3. duplicate client order ids — two or more venue orders (open orders, trades, order lookups) under
   one client order id, or a venue order whose id differs from the one Meltica stored: halted;
4. balances — the venue's totals against the given ``Portfolio``, else the local ledger: the latest
   ``balance_snapshots`` of source ``local`` rolled forward by the fills recorded since; drift beyond
   the per-asset tolerance is reported; the venue's balances are stored as a snapshot with source
   ``venue``.

The run (``reconciliation_runs``) and its discrepancies (``reconciliation_discrepancies``, append-only)
are stored; a failing venue or database fails the run (status ``failed``) with a taxonomy error.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from meltica.adapters.base import ExchangeAdapter, VenueOrder
from meltica.domain import (
    Balance,
    Fill,
    Order,
    OrderAccepted,
    OrderCancelled,
    OrderEvent,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    OrderStatus,
)
from meltica.errors import (
    DataValidationError,
    IllegalStateTransitionError,
    InfrastructureUnavailableError,
    MelticaError,
    OrderNotFoundError,
    TerminalError,
)
from meltica.execution.store import OrderStore
from meltica.portfolio import Portfolio
from meltica.portfolio.portfolio import is_derivative, split_symbol
from meltica.reconciliation.policy import KIND_OF, Action, Case, DiscrepancyKind, ReconcilePolicy
from meltica.risk.kill_switch import KillSwitch, KillSwitchMode, system_clock
from meltica.storage import tables as t
from meltica.storage.errors import classify_database_error

log = logging.getLogger(__name__)

ACTOR = "reconciliation"
NOTE = "reconciled"  # the non-lifecycle order_events row written next to every adoption
VENUE_SOURCE = "venue"
LOCAL_SOURCE = "local"
_OPEN = (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED, OrderStatus.PENDING_CANCEL)
_PENDING = (OrderStatus.NEW, OrderStatus.PENDING_SUBMIT)
# Why a venue refuses open orders without a symbol (ccxt ArgumentsRequired / NotSupported).
_NEEDS_SYMBOL = frozenset({"arguments_required", "not_supported"})

LegKey = tuple[str, str]  # (trade id, side): the two legs of a self-trade share the trade id


@dataclass(frozen=True)
class Discrepancy:
    kind: DiscrepancyKind
    case: Case
    subject: str  # "order:<coid>", "fill:<trade id>", "balance:<asset>"
    local: dict[str, Any] | None
    venue: dict[str, Any] | None
    action: Action
    outcome: str  # what was done: "adopted", "reported", "halted strategy:s", "not adopted: …"
    ts: datetime
    strategy: str | None = None
    symbol: str | None = None

    @property
    def stored_action(self) -> str:
        return f"{self.outcome} ({self.case.value})"


@dataclass
class ReconciliationReport:
    run_id: uuid.UUID
    account: str
    exchange: str
    trigger: str
    started_at: datetime
    finished_at: datetime | None = None
    status: str = "running"
    discrepancies: list[Discrepancy] = field(default_factory=list)
    halted_scopes: list[str] = field(default_factory=list)
    orders_checked: int = 0
    trades_checked: int = 0
    open_orders_checked: int = 0
    symbols: list[str] = field(default_factory=list)
    # client order ids whose events this run appended (an OMS holding them in memory reloads them)
    adopted_orders: list[str] = field(default_factory=list)
    balances_compared: bool = False
    balance_baseline: str | None = None  # "portfolio", "snapshot <ts>" or None (nothing to compare)
    error: str | None = None

    def of_kind(self, kind: DiscrepancyKind | str) -> list[Discrepancy]:
        return [d for d in self.discrepancies if d.kind == kind]

    def of_case(self, case: Case | str) -> list[Discrepancy]:
        return [d for d in self.discrepancies if d.case == case]

    @property
    def clean(self) -> bool:
        return not self.discrepancies

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.discrepancies:
            out[d.kind.value] = out.get(d.kind.value, 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "discrepancies": len(self.discrepancies),
            "by_kind": self.counts(),
            "adopted": sum(1 for d in self.discrepancies if d.outcome == "adopted"),
            "halted_scopes": list(self.halted_scopes),
            "orders_checked": self.orders_checked,
            "trades_checked": self.trades_checked,
            "open_orders_checked": self.open_orders_checked,
            "symbols": list(self.symbols),
            "adopted_orders": list(self.adopted_orders),
            "balances_compared": self.balances_compared,
            "balance_baseline": self.balance_baseline,
            "error": self.error,
        }


def _json(value: object) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value  # enums
    return value


def _order_view(order: Order) -> dict[str, Any]:
    return {
        "client_order_id": order.client_order_id,
        "exchange_order_id": order.exchange_order_id,
        "strategy": order.intent.strategy,
        "symbol": order.symbol,
        "side": order.side.value,
        "status": order.status.value,
        "quantity": str(order.quantity),
        "filled_quantity": str(order.filled_quantity),
    }


def _venue_view(vo: VenueOrder) -> dict[str, Any]:
    return {
        "client_order_id": vo.client_order_id,
        "exchange_order_id": vo.exchange_order_id,
        "symbol": vo.symbol,
        "side": vo.side.value,
        "status": vo.status.value,
        "quantity": str(vo.quantity),
        "filled_quantity": str(vo.filled_quantity),
        "price": None if vo.price is None else str(vo.price),
    }


def _fill_view(fill: Fill) -> dict[str, Any]:
    return {
        "trade_id": fill.fill_id,
        "client_order_id": fill.client_order_id,
        "exchange_order_id": fill.exchange_order_id,
        "symbol": fill.symbol,
        "side": fill.side.value,
        "price": str(fill.price),
        "quantity": str(fill.quantity),
        "fee": str(fill.fee),
        "fee_currency": fill.fee_currency,
        "ts": fill.ts.isoformat(),
    }


def _ledger_moves(fills: Iterable[Any]) -> dict[str, Decimal]:
    """What spot fills did to each asset's total (base and quote moved, fee paid in its currency)."""
    moved: dict[str, Decimal] = {}
    for fill in fills:
        if is_derivative(fill.symbol):
            continue  # a position, not a balance: settled in PnL
        try:
            base, quote, _ = split_symbol(fill.symbol)
        except ValueError:
            continue
        sign = Decimal(1) if fill.side == "buy" else Decimal(-1)
        moved[base] = moved.get(base, Decimal(0)) + sign * fill.quantity
        moved[quote] = moved.get(quote, Decimal(0)) - sign * fill.quantity * fill.price
        if fill.fee and fill.fee_currency:
            moved[fill.fee_currency] = moved.get(fill.fee_currency, Decimal(0)) - fill.fee
    return moved


def store_balances(
    engine: Engine, account: str, exchange: str, balances: Mapping[str, Balance], ts: datetime, *, source: str
) -> int:
    """Store ``balances`` (non-zero totals) as one ``balance_snapshots`` row set of ``source``."""
    rows = [
        {
            "account": account,
            "exchange": exchange,
            "asset": asset,
            "ts": ts,
            "free": bal.free,
            "locked": bal.locked,
            "total": bal.total,
            "source": source,
        }
        for asset, bal in sorted(balances.items())
        if bal.total != 0
    ]
    if rows:
        with engine.begin() as conn:
            conn.execute(t.balance_snapshots.insert(), rows)
    return len(rows)


class _Run:
    """One reconciliation of one account: the state the checks share."""

    def __init__(
        self,
        engine: Engine,
        adapter: ExchangeAdapter,
        *,
        account: str,
        policy: ReconcilePolicy,
        kill_switch: KillSwitch | None,
        clock: Callable[[], datetime],
        report: ReconciliationReport,
    ) -> None:
        self.engine = engine
        self.adapter = adapter
        self.account = account
        self.exchange = adapter.exchange_id
        self.policy = policy
        self.kill_switch = kill_switch
        self.clock = clock
        self.report = report
        self.store = OrderStore(engine)
        # client order id → the venue order ids seen under it (open orders, trades, order lookups)
        self.venue_ids: dict[str, set[str]] = {}
        self.duplicate_ids: set[str] = set()  # reported already (by a fill or an open order)

    # --- recording ----------------------------------------------------------------------------

    def _halt(self, case: Case, subject: str, strategy: str | None) -> str:
        scope = f"strategy:{strategy}" if strategy else f"account:{self.account}"
        if self.kill_switch is None:
            log.error(
                "reconciliation of %s: %s %s needs a halt of %s, but no kill switch", self.account, case, subject, scope
            )
            return f"halt needed ({scope}): no kill switch"
        self.kill_switch.engage(
            KillSwitchMode.HALT,
            reason=f"reconciliation {self.report.run_id}: {case.value} {subject}",
            actor=ACTOR,
            scope=scope,
            details={"run_id": str(self.report.run_id), "case": case.value, "subject": subject},
        )
        if scope not in self.report.halted_scopes:
            self.report.halted_scopes.append(scope)
        return f"halted {scope}"

    def add(
        self,
        case: Case,
        subject: str,
        *,
        local: dict[str, Any] | None,
        venue: dict[str, Any] | None,
        adopt: Callable[[], str | None] | None = None,
        strategy: str | None = None,
        symbol: str | None = None,
    ) -> Discrepancy:
        """Classify, apply the policy (``adopt`` returns ``None`` on success, else why not), record."""
        action = self.policy.action_for(case)
        if action is Action.ADOPT and adopt is not None:
            failure = adopt()
            outcome = "adopted" if failure is None else f"not adopted: {failure}"
        elif action is Action.HALT:
            if adopt is not None and case is Case.FILL_UNKNOWN_ORDER:
                adopt()  # the trade happened: record it, then stop the account
            outcome = self._halt(case, subject, strategy)
        else:
            outcome = "reported"
        discrepancy = Discrepancy(
            KIND_OF[case], case, subject, local, venue, action, outcome, self.clock(), strategy, symbol
        )
        log.warning("reconciliation of %s: %s %s → %s", self.account, case.value, subject, outcome)
        self.report.discrepancies.append(discrepancy)
        return discrepancy

    def _note(self, order: Order, case: Case, payload: Mapping[str, Any]) -> None:
        self.store.record_note(
            order, NOTE, self.clock(), {"run_id": str(self.report.run_id), "case": case.value, **payload}
        )

    def _append(self, order: Order, event: OrderEvent, case: Case) -> str | None:
        try:
            new = order.apply(event)
        except (IllegalStateTransitionError, DataValidationError) as exc:
            return str(exc)
        if new is not order:
            self.store.append_event(new, event)
            self._note(new, case, {"event": event.model_dump(mode="json")})
            if new.client_order_id not in self.report.adopted_orders:
                self.report.adopted_orders.append(new.client_order_id)
        return None

    # --- reads --------------------------------------------------------------------------------

    async def venue_open_orders(self) -> list[VenueOrder] | None:
        """Every open order of the account on the venue, all symbols; ``None`` when the venue needs a symbol."""
        try:
            return await self.adapter.fetch_open_orders(None)
        except TerminalError as exc:
            if exc.reason not in _NEEDS_SYMBOL:
                raise
            log.warning("%s needs a symbol for open orders: checked per symbol (%s)", self.exchange, exc)
            return None

    async def symbols(
        self, balances: Mapping[str, Balance], open_orders: list[VenueOrder], portfolio: Portfolio | None
    ) -> list[str]:
        """Every symbol that can carry exposure or history of the account (see the module docstring)."""
        found: set[str] = set(self.policy.symbols) | {vo.symbol for vo in open_orders}
        o, f, p = t.orders.c, t.fills.c, t.position_snapshots.c
        with self.engine.connect() as conn:
            found |= set(
                conn.execute(
                    select(o.symbol).where(o.account == self.account, o.exchange == self.exchange).distinct()
                ).scalars()
            )
            found |= set(
                conn.execute(
                    select(f.symbol).where(f.account == self.account, f.exchange == self.exchange).distinct()
                ).scalars()
            )
            latest = (
                select(
                    p.symbol, p.quantity, func.row_number().over(partition_by=p.symbol, order_by=p.ts.desc()).label("n")
                )
                .where(p.account == self.account, p.exchange == self.exchange, p.strategy == "")
                .subquery()
            )
            found |= set(conn.execute(select(latest.c.symbol).where(latest.c.n == 1, latest.c.quantity != 0)).scalars())
        if portfolio is not None:
            found |= {
                pos.symbol
                for pos in portfolio.positions(account=self.account, exchange=self.exchange, include_flat=False)
            }
        if self.policy.balance_markets:
            held = {asset for asset, bal in balances.items() if bal.total > self.policy.tolerance(asset)}
            instruments = await self.adapter.load_instruments()
            found |= {
                symbol
                for symbol, inst in instruments.items()
                if inst.base in held and inst.active and not is_derivative(symbol)
            }
        return sorted(found)

    def _known_legs(self, symbol: str) -> set[LegKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.fills.c.trade_id, t.fills.c.side).where(
                    t.fills.c.exchange == self.exchange,
                    t.fills.c.account == self.account,
                    t.fills.c.symbol == symbol,
                )
            ).all()
        return {(row.trade_id, row.side) for row in rows}

    def _order_by_exchange_id(self, exchange_order_id: str) -> Order | None:
        with self.engine.connect() as conn:
            coid = conn.execute(
                select(t.orders.c.client_order_id).where(
                    t.orders.c.account == self.account,
                    t.orders.c.exchange == self.exchange,
                    t.orders.c.exchange_order_id == exchange_order_id,
                )
            ).scalar_one_or_none()
        return None if coid is None else self.store.get(coid)

    def _owner(self, client_order_id: str | None, exchange_order_id: str | None) -> tuple[Order | None, bool]:
        """The stored order a venue order (or its trade) belongs to, and whether the venue order is a
        *second* one under that order's client id (its venue order id differs from the stored one)."""
        if exchange_order_id:
            order = self._order_by_exchange_id(exchange_order_id)
            if order is not None:
                return order, False
        if client_order_id:
            order = self.store.get(client_order_id)
            if order is not None and order.account == self.account:
                duplicate = bool(
                    exchange_order_id and order.exchange_order_id and order.exchange_order_id != exchange_order_id
                )
                return order, duplicate
        return None, False

    def _saw(self, client_order_id: str | None, exchange_order_id: str | None) -> None:
        # A client id the adapter could not resolve comes back as "<exchange>:<order id>": not a client id.
        if client_order_id and exchange_order_id and not client_order_id.startswith(f"{self.exchange}:"):
            self.venue_ids.setdefault(client_order_id, set()).add(exchange_order_id)

    # --- checks -------------------------------------------------------------------------------

    async def trades(self, symbol: str) -> None:
        venue_trades = await self.adapter.fetch_my_trades(symbol)
        self.report.trades_checked += len(venue_trades)
        known = self._known_legs(symbol)
        for fill in sorted(venue_trades, key=lambda f: (f.ts, f.fill_id, f.side.value)):
            self._saw(fill.client_order_id, fill.exchange_order_id)
            if (fill.fill_id, fill.side.value) in known:
                continue
            order, duplicate = self._owner(fill.client_order_id, fill.exchange_order_id)
            if order is not None and not duplicate and fill.fill_id in order.fill_ids:
                continue  # on its order (the fills row of a self-trade's second leg may be missing)
            subject = f"fill:{fill.fill_id}:{fill.side.value}"
            if order is None or duplicate:
                self.add(
                    Case.FILL_UNKNOWN_ORDER,
                    subject,
                    local=None if order is None else _order_view(order),
                    venue=_fill_view(fill),
                    adopt=partial(self._record_orphan, fill),
                    strategy=None if order is None else order.intent.strategy,
                    symbol=symbol,
                )
                continue
            own = fill.model_copy(update={"client_order_id": order.client_order_id})
            self.add(
                Case.FILL_MISSING_LOCALLY,
                subject,
                local=_order_view(order),
                venue=_fill_view(fill),
                adopt=partial(self._adopt_fill, order, own),
                strategy=order.intent.strategy,
                symbol=symbol,
            )

    def _record_orphan(self, fill: Fill) -> str | None:
        self.store.record_fill(fill, self.account, None)
        return None

    def _adopt_fill(self, order: Order, fill: Fill) -> str | None:
        current = self.store.get(order.client_order_id) or order
        event = OrderFilled(
            event_id=f"fill:{fill.fill_id}", client_order_id=current.client_order_id, ts=fill.ts, fill=fill
        )
        failure = self._append(current, event, Case.FILL_MISSING_LOCALLY)
        if failure is not None:
            # The order cannot take it (closed, overfill): the trade is still a fact of the venue.
            self.store.record_fill(fill, self.account, current.intent.strategy)
            self._note(current, Case.FILL_MISSING_LOCALLY, {"fill": _fill_view(fill), "not_applied": failure})
        return None

    async def orders(self) -> None:
        now = self.clock()
        for order in self.store.load_open(self.account, include_emulated=False):
            if order.exchange != self.exchange:
                continue
            self.report.orders_checked += 1
            subject = f"order:{order.client_order_id}"
            strategy = order.intent.strategy
            try:
                vo = await self.adapter.fetch_order(
                    order.symbol, client_order_id=order.client_order_id, exchange_order_id=order.exchange_order_id
                )
            except OrderNotFoundError:
                vo = None
            if vo is None:
                if order.status in _PENDING:
                    if (now - order.updated_at).total_seconds() < self.policy.pending_grace_s:
                        continue  # the OMS may be sending it right now
                    event = OrderRejected(
                        event_id="rejected", client_order_id=order.client_order_id, ts=now, reason="never reached venue"
                    )
                    self.add(
                        Case.ORDER_NEVER_SENT,
                        subject,
                        local=_order_view(order),
                        venue=None,
                        adopt=partial(self._append, order, event, Case.ORDER_NEVER_SENT),
                        strategy=strategy,
                        symbol=order.symbol,
                    )
                else:
                    self.add(
                        Case.ORDER_MISSING_ON_VENUE,
                        subject,
                        local=_order_view(order),
                        venue=None,
                        strategy=strategy,
                        symbol=order.symbol,
                    )
                continue
            self._saw(order.client_order_id, vo.exchange_order_id)
            self._compare_order(order, vo, subject)

    def _compare_order(self, order: Order, vo: VenueOrder, subject: str) -> None:
        now, coid, strategy = self.clock(), order.client_order_id, order.intent.strategy
        local, venue = _order_view(order), _venue_view(vo)
        if vo.filled_quantity > order.filled_quantity:
            self.add(Case.FILLS_UNEXPLAINED, subject, local=local, venue=venue, strategy=strategy, symbol=order.symbol)
        elif vo.filled_quantity < order.filled_quantity:
            self.add(Case.OVERFILLED_LOCALLY, subject, local=local, venue=venue, strategy=strategy, symbol=order.symbol)
        if order.status in _PENDING and vo.exchange_order_id and vo.status is not OrderStatus.REJECTED:
            accepted = OrderAccepted(
                event_id="accepted", client_order_id=coid, ts=now, exchange_order_id=vo.exchange_order_id
            )
            self.add(
                Case.VENUE_ACCEPTED,
                subject,
                local=local,
                venue=venue,
                adopt=lambda: self._append(order, accepted, Case.VENUE_ACCEPTED),
                strategy=strategy,
                symbol=order.symbol,
            )
            order = self.store.get(coid) or order
        terminal: OrderEvent | None = None
        if vo.status is OrderStatus.CANCELLED:
            terminal = OrderCancelled(event_id="cancelled", client_order_id=coid, ts=now, reason=vo.reason)
        elif vo.status is OrderStatus.EXPIRED:
            terminal = OrderExpired(event_id="expired", client_order_id=coid, ts=now)
        elif vo.status is OrderStatus.REJECTED:
            terminal = OrderRejected(
                event_id="rejected", client_order_id=coid, ts=now, reason=vo.reason or "rejected by venue"
            )
        if terminal is not None:
            closing = terminal
            self.add(
                Case.VENUE_CLOSED,
                subject,
                local=_order_view(order),
                venue=venue,
                adopt=lambda: self._append(self.store.get(coid) or order, closing, Case.VENUE_CLOSED),
                strategy=strategy,
                symbol=order.symbol,
            )

    def unknown_open_orders(self, open_orders: list[VenueOrder]) -> None:
        self.report.open_orders_checked += len(open_orders)
        for vo in open_orders:
            self._saw(vo.client_order_id, vo.exchange_order_id)
            order, duplicate = self._owner(vo.client_order_id, vo.exchange_order_id)
            subject = f"order:{vo.client_order_id or vo.exchange_order_id}"
            if duplicate:
                continue  # a second venue order under a known client id: the duplicate check reports it
            if order is None:
                self.add(Case.ORDER_UNKNOWN_LOCALLY, subject, local=None, venue=_venue_view(vo), symbol=vo.symbol)
            elif order.is_terminal:
                self.add(
                    Case.VENUE_OPEN_LOCAL_CLOSED,
                    subject,
                    local=_order_view(order),
                    venue=_venue_view(vo),
                    strategy=order.intent.strategy,
                    symbol=vo.symbol,
                )

    def duplicates(self) -> None:
        """One discrepancy per client order id carried by more than one venue order."""
        for coid, seen in sorted(self.venue_ids.items()):
            order = self.store.get(coid)
            if order is not None and order.account != self.account:
                order = None
            ids = set(seen)
            if order is not None and order.exchange_order_id:
                ids.add(order.exchange_order_id)
            if len(ids) < 2:
                continue
            self.add(
                Case.DUPLICATE_CLIENT_ORDER_ID,
                f"order:{coid}",
                local=None if order is None else _order_view(order),
                venue={"client_order_id": coid, "exchange_order_ids": sorted(ids)},
                strategy=None if order is None else order.intent.strategy,
                symbol=None if order is None else order.symbol,
            )

    def balances(self, venue: Mapping[str, Balance], portfolio: Portfolio | None) -> None:
        ts = self.clock()
        local = self._local_balances(portfolio)
        if local is not None:
            self.report.balances_compared = True
            for asset in sorted(set(local) | set(venue)):
                mine = local.get(asset)
                theirs = venue.get(asset)
                local_total = Decimal(0) if mine is None else mine[2]
                venue_total = Decimal(0) if theirs is None else theirs.total
                drift = venue_total - local_total
                if abs(drift) <= self.policy.tolerance(asset):
                    continue
                self.add(
                    Case.BALANCE_DRIFT,
                    f"balance:{asset}",
                    local=None
                    if mine is None
                    else {"free": str(mine[0]), "locked": str(mine[1]), "total": str(mine[2])},
                    venue={
                        "free": str(Decimal(0) if theirs is None else theirs.free),
                        "locked": str(Decimal(0) if theirs is None else theirs.locked),
                        "total": str(venue_total),
                        "drift": str(drift),
                        "tolerance": str(self.policy.tolerance(asset)),
                    },
                )
        store_balances(self.engine, self.account, self.exchange, venue, ts, source=VENUE_SOURCE)

    def _local_balances(self, portfolio: Portfolio | None) -> dict[str, tuple[Decimal, Decimal, Decimal]] | None:
        """``{asset: (free, locked, total)}`` Meltica believes in: the portfolio's holdings, else the latest
        local snapshot rolled forward by every fill recorded after it (``None``: no local view at all)."""
        if portfolio is not None:
            self.report.balance_baseline = "portfolio"
            return {
                asset: (h.free, h.locked, h.total)
                for (exchange, asset), h in portfolio.holdings(self.account, self.exchange).items()
                if exchange == self.exchange
            }
        b, f = t.balance_snapshots.c, t.fills.c
        with self.engine.connect() as conn:
            latest = conn.execute(
                select(func.max(b.ts)).where(
                    b.account == self.account, b.exchange == self.exchange, b.source == LOCAL_SOURCE
                )
            ).scalar_one_or_none()
            if latest is None:
                return None
            rows = conn.execute(
                select(b.asset, b.free, b.locked, b.total).where(
                    b.account == self.account, b.exchange == self.exchange, b.source == LOCAL_SOURCE, b.ts == latest
                )
            ).all()
            # recorded_at, not the venue's trade time: what Meltica learned of after it took the snapshot
            since = conn.execute(
                select(f.symbol, f.side, f.price, f.quantity, f.fee, f.fee_currency).where(
                    f.account == self.account, f.exchange == self.exchange, f.recorded_at > latest
                )
            ).all()
        out = {row.asset: (row.free, row.locked, row.total) for row in rows}
        moved = _ledger_moves(since)
        for asset, delta in moved.items():
            free, locked, total = out.get(asset, (Decimal(0), Decimal(0), Decimal(0)))
            out[asset] = (free + delta, locked, total + delta)
        self.report.balance_baseline = f"snapshot {latest.isoformat()} + {len(since)} fills since"
        return out

    # --- storing the run ----------------------------------------------------------------------

    def start(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                t.reconciliation_runs.insert().values(
                    run_id=self.report.run_id,
                    account=self.account,
                    exchange=self.exchange,
                    trigger=self.report.trigger,
                    status="running",
                    started_at=self.report.started_at,
                )
            )

    def finish(self) -> None:
        report = self.report
        rows = [
            {
                "discrepancy_id": uuid.uuid4(),
                "run_id": report.run_id,
                "kind": d.kind.value,
                "subject": d.subject,
                "local": _json(d.local),
                "venue": _json(d.venue),
                "action": d.stored_action,
                "ts": d.ts,
            }
            for d in report.discrepancies
        ]
        with self.engine.begin() as conn:
            if rows:
                conn.execute(t.reconciliation_discrepancies.insert(), rows)
            conn.execute(
                t.reconciliation_runs.update()
                .where(t.reconciliation_runs.c.run_id == report.run_id)
                .values(status=report.status, summary=_json(report.summary()), finished_at=report.finished_at)
            )


def _db_unavailable(exc: DBAPIError) -> MelticaError:
    """Unavailable (retryable) or a refused login (terminal), with the server's reason in the message."""
    return classify_database_error(exc, "reconciliation") or InfrastructureUnavailableError(
        f"reconciliation: the database is unavailable: {type(exc).__name__}", reason="database_unavailable"
    )


async def reconcile_account(
    engine: Engine,
    adapter: ExchangeAdapter,
    *,
    account: str,
    policy: ReconcilePolicy | None = None,
    kill_switch: KillSwitch | None = None,
    trigger: str = "schedule",
    portfolio: Portfolio | None = None,
    clock: Callable[[], datetime] = system_clock,
) -> ReconciliationReport:
    """Reconcile ``account`` (its orders, fills, open orders on every symbol, duplicate client order ids
    and balances) against ``adapter`` (already connected); see the module docstring for what is compared.

    Returns the report, also stored. Raises the taxonomy's errors: a retryable one when the venue or the
    database cannot be reached (the run, when it could be stored, is marked ``failed``).
    """
    policy = (policy or ReconcilePolicy()).validate()
    report = ReconciliationReport(
        run_id=uuid.uuid4(), account=account, exchange=adapter.exchange_id, trigger=trigger, started_at=clock()
    )
    run = _Run(engine, adapter, account=account, policy=policy, kill_switch=kill_switch, clock=clock, report=report)
    try:
        run.start()
    except OperationalError as exc:
        raise _db_unavailable(exc) from exc
    try:
        venue_balances = await adapter.fetch_balances()
        open_orders = await run.venue_open_orders()
        report.symbols = await run.symbols(venue_balances, open_orders or [], portfolio)
        if open_orders is None:  # the venue lists open orders per symbol only
            open_orders = [vo for symbol in report.symbols for vo in await adapter.fetch_open_orders(symbol)]
        for symbol in report.symbols:
            await run.trades(symbol)
        await run.orders()
        run.unknown_open_orders(open_orders)
        run.duplicates()
        run.balances(venue_balances, portfolio)
        report.status = "completed"
    except (MelticaError, DBAPIError) as exc:
        report.status = "failed"
        report.error = f"{type(exc).__name__}: {exc}"
        report.finished_at = clock()
        try:
            run.finish()
        except DBAPIError:
            log.exception("reconciliation run %s could not be stored as failed", report.run_id)
        if isinstance(exc, OperationalError):
            raise _db_unavailable(exc) from exc
        raise
    report.finished_at = clock()
    try:
        run.finish()
    except OperationalError as exc:
        raise _db_unavailable(exc) from exc
    return report
