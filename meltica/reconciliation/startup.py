"""Reconciliation wired into the execution stage: at start, after a user-stream reconnect, on a schedule.

``startup_hook(engine, settings)`` returns the hook ``ExecutionService(..., on_lane_start=hook)`` calls for
each account after its driver started and ``oms.recover()`` finished, before any request is accepted::

    await hook(account, adapter, oms, portfolio)

It runs the full reconciliation of the account (``reconcile_account``), engages the persisted kill switch
where the policy halts, stores the report, makes the OMS reload the orders the run adopted venue facts
into (``oms.reload``) and then its own kill switch see the halts, and seeds ``portfolio`` with the venue's
balances (stored as the new ``local`` balance snapshot: the baseline of the next run). It raises — the
worker must not start — when the reconciliation itself fails (venue unreachable, database down).

The same hook with ``trigger="reconnect"`` or ``trigger="schedule"`` serves after a reconnect
(``bind(hook, account, adapter, oms, portfolio)`` is a ``LiveDriver.on_reconnect``) and on a schedule
(``every(interval_s, bound)``). At start the balances are compared with the stored ledger (the latest local
snapshot plus the fills since); later with the live ``portfolio`` once it holds the account's balances.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from meltica.adapters.base import ExchangeAdapter
from meltica.config.settings import MelticaSettings
from meltica.errors import InfrastructureUnavailableError
from meltica.execution.oms import OrderManager
from meltica.portfolio import Portfolio
from meltica.reconciliation.policy import ReconcilePolicy
from meltica.reconciliation.reconcile import (
    LOCAL_SOURCE,
    ReconciliationReport,
    reconcile_account,
    store_balances,
)
from meltica.risk.kill_switch import KillSwitch, KillSwitchMode, system_clock
from meltica.risk.store import KillSwitchStore

log = logging.getLogger(__name__)

STARTUP, RECONNECT, SCHEDULE = "startup", "reconnect", "schedule"


def _enabled(settings: MelticaSettings, trigger: str) -> bool:
    switches = settings.live.reconcile
    if trigger == STARTUP:
        return switches.at_start
    if trigger == RECONNECT:
        return switches.after_reconnect
    if trigger == SCHEDULE:
        return switches.interval_s > 0
    return True


def _persisted_kill_switch(engine: Engine) -> KillSwitch:
    try:
        return KillSwitch(KillSwitchStore(engine))
    except DBAPIError as exc:
        raise InfrastructureUnavailableError(
            f"database unavailable: the kill switch cannot be read ({type(exc.orig).__name__ if exc.orig else exc})",
            reason="database_unavailable",
        ) from exc


def _tell_the_oms(report: ReconciliationReport, persisted: KillSwitch, oms: OrderManager) -> None:
    """The OMS (and the risk gate sharing its switch) must refuse orders now, not at the next refresh."""
    own = oms.kill_switch
    if not report.halted_scopes or not isinstance(own, KillSwitch) or own is persisted:
        return
    own.refresh()  # a switch backed by the database sees the halts here
    for scope in report.halted_scopes:
        if own.state_of(scope).mode is not KillSwitchMode.HALT:
            state = persisted.state_of(scope)
            own.engage(KillSwitchMode.HALT, reason=state.reason or "reconciliation", actor=state.actor, scope=scope)


def _reload_adopted(report: ReconciliationReport, oms: OrderManager) -> None:
    """Orders the run appended venue facts to: the OMS replaces its in-memory copies from the store before it
    hears of any halt (acting on a stale copy — cancelling an order the venue already closed — would store
    events out of order)."""
    for coid in report.adopted_orders:
        oms.reload(coid)


class LaneReconciler:
    """The hook ``startup_hook`` returns: ``await reconciler(account, adapter, oms, portfolio)`` → ``None``.

    ``reports`` keeps each account's latest report (``None`` when the trigger is switched off)."""

    def __init__(
        self,
        engine: Engine,
        settings: MelticaSettings,
        *,
        trigger: str,
        policy: ReconcilePolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.trigger = trigger
        self.policy = policy.validate()
        self.clock = clock
        self.enabled = _enabled(settings, trigger)
        self.reports: dict[str, ReconciliationReport | None] = {}

    async def __call__(self, account: str, adapter: ExchangeAdapter, oms: OrderManager, portfolio: Portfolio) -> None:
        report: ReconciliationReport | None = None
        if self.enabled:
            report = await self._reconcile(account, adapter, oms, portfolio)
        elif self.trigger != STARTUP:
            self.reports[account] = None
            return
        else:
            log.warning("reconciliation at start is off (live.reconcile.at_start): account %s not reconciled", account)
        self.reports[account] = report
        balances = await adapter.fetch_balances()
        portfolio.set_balances(account, adapter.exchange_id, balances)
        try:
            store_balances(self.engine, account, adapter.exchange_id, balances, self.clock(), source=LOCAL_SOURCE)
        except DBAPIError as exc:
            raise InfrastructureUnavailableError(
                "database unavailable: the seeded balances cannot be stored", reason="database_unavailable"
            ) from exc

    def _baseline(self, account: str, exchange: str, portfolio: Portfolio) -> Portfolio | None:
        """At start the stored ledger is Meltica's belief (the portfolio is not seeded yet); later the live
        portfolio is, once it holds the account's balances."""
        if self.trigger == STARTUP or not portfolio.holdings(account, exchange):
            return None
        return portfolio

    async def _reconcile(
        self, account: str, adapter: ExchangeAdapter, oms: OrderManager, portfolio: Portfolio
    ) -> ReconciliationReport:
        persisted = _persisted_kill_switch(self.engine)
        try:
            report = await reconcile_account(
                self.engine,
                adapter,
                account=account,
                policy=self.policy,
                kill_switch=persisted,
                trigger=self.trigger,
                portfolio=self._baseline(account, adapter.exchange_id, portfolio),
                clock=self.clock,
            )
        except Exception:
            log.critical("reconciliation (%s) of account %s failed: the lane must not trade", self.trigger, account)
            raise
        _reload_adopted(report, oms)
        _tell_the_oms(report, persisted, oms)
        log.log(
            logging.ERROR if report.halted_scopes else logging.INFO,
            "reconciliation (%s) of %s: %d discrepancies, halted %s (run %s)",
            self.trigger,
            account,
            len(report.discrepancies),
            ", ".join(report.halted_scopes) or "nothing",
            report.run_id,
        )
        return report


def startup_hook(
    engine: Engine,
    settings: MelticaSettings,
    *,
    trigger: str = STARTUP,
    policy: ReconcilePolicy | None = None,
    clock: Callable[[], datetime] = system_clock,
) -> LaneReconciler:
    """The per-account hook of the execution stage (module docstring). ``settings.live.reconcile`` switches
    the reconciliation off per trigger (the balances are still taken from the venue at start)."""
    return LaneReconciler(engine, settings, trigger=trigger, policy=policy or ReconcilePolicy(), clock=clock)


LaneHook = Callable[[str, ExchangeAdapter, OrderManager, Portfolio], Awaitable[None]]


def bind(
    hook: LaneHook, account: str, adapter: ExchangeAdapter, oms: OrderManager, portfolio: Portfolio
) -> Callable[[], Awaitable[None]]:
    """``hook`` for one lane, as a no-argument callback (``LiveDriver.on_reconnect``)."""

    async def run() -> None:
        await hook(account, adapter, oms, portfolio)

    return run


async def every(
    interval_s: float,
    run: Callable[[], Awaitable[None]],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Call ``run`` every ``interval_s`` seconds until cancelled. A failed run ends the loop with its
    exception: the caller stops the worker (fail closed) rather than trade unreconciled."""
    if interval_s <= 0:
        return
    while True:
        await sleep(interval_s)
        await run()
