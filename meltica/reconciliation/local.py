"""Reconcile configured accounts in this process: no Prefect server (``meltica reconcile --local``).

Adapters come from the configuration (``adapter_for_account``: ``env:``/``encrypted:`` references, else the
key store), the kill switch is the persisted one, every report is stored as the flow's are. One account's
failure does not stop the others; each outcome says what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from meltica.adapters.factory import adapter_for_account
from meltica.adapters.registry import PAPER
from meltica.config.settings import MelticaSettings
from meltica.errors import ConfigurationError, InfrastructureUnavailableError, MelticaError
from meltica.reconciliation.markdown import markdown
from meltica.reconciliation.policy import ReconcilePolicy
from meltica.reconciliation.reconcile import ReconciliationReport, reconcile_account
from meltica.risk.kill_switch import KillSwitch, system_clock
from meltica.risk.store import KillSwitchStore
from meltica.secrets import CredentialStore


@dataclass
class AccountOutcome:
    account: str
    report: ReconciliationReport | None = None
    error: str | None = None  # the run failed: venue, database, credentials

    @property
    def halted(self) -> bool:
        return self.report is not None and bool(self.report.halted_scopes)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.halted

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"account": self.account, "ok": self.ok, "error": self.error}
        if self.report is not None:
            out |= {
                "run_id": str(self.report.run_id),
                "status": self.report.status,
                **self.report.summary(),
                "discrepancy_list": [
                    {"kind": d.kind.value, "case": d.case.value, "subject": d.subject, "action": d.stored_action}
                    for d in self.report.discrepancies
                ],
                "markdown": markdown(self.report),
            }
        return out


def reconcilable_accounts(settings: MelticaSettings, names: Sequence[str] = ()) -> list[str]:
    """``names`` (each must be configured), else every configured account with a venue to ask (not paper)."""
    configured = {a.name: a for a in settings.accounts}
    for name in names:
        if name not in configured:
            known = ", ".join(configured) or "none"
            raise ConfigurationError(
                f"no account named {name!r} in the configuration (known: {known})", field="accounts"
            )
    if names:
        return list(dict.fromkeys(names))
    return [a.name for a in settings.accounts if a.exchange != PAPER]


async def reconcile_accounts(
    engine: Engine,
    settings: MelticaSettings,
    accounts: Sequence[str],
    *,
    policy: ReconcilePolicy | None = None,
    trigger: str = "cli",
    credential_store: CredentialStore | None = None,
    clock: Callable[[], datetime] = system_clock,
) -> list[AccountOutcome]:
    """Reconcile each account in turn; a failure is recorded in its outcome, never hidden."""
    chosen = (policy or ReconcilePolicy()).validate()
    try:
        kill_switch = KillSwitch(KillSwitchStore(engine), clock=clock)
    except DBAPIError as exc:
        raise InfrastructureUnavailableError(
            f"database unavailable: {type(exc.orig).__name__ if exc.orig else exc}", reason="database_unavailable"
        ) from exc
    outcomes: list[AccountOutcome] = []
    for name in accounts:
        outcome = AccountOutcome(name)
        outcomes.append(outcome)
        try:
            adapter = adapter_for_account(settings, name, credential_store=credential_store)
        except MelticaError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            continue
        try:
            await adapter.connect()
            outcome.report = await reconcile_account(
                engine, adapter, account=name, policy=chosen, kill_switch=kill_switch, trigger=trigger, clock=clock
            )
        except (MelticaError, DBAPIError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        finally:
            await adapter.close()
    return outcomes
