"""Reconcile accounts against their venues as a Prefect flow run (scheduled, or on demand by an operator).

A thin shell over ``meltica.reconciliation``: it builds each account's adapter from configuration and
the engine from the configured database, gives each account a task run (retried only for the retryable
family: venue or database unreachable), and publishes the markdown report as an artifact. The flow
fails with the taxonomy's error when an account could not be reconciled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from sqlalchemy.exc import OperationalError

from flows import config_file_of, scrub_secrets_in_logs
from flows._retry import meltica_task
from meltica.adapters.factory import adapter_for_account
from meltica.config import load_settings
from meltica.errors import MelticaError
from meltica.infra.postgres import database_url
from meltica.reconciliation import ReconcilePolicy, ReconciliationReport, markdown, reconcile_account
from meltica.risk import KillSwitch, KillSwitchStore
from meltica.storage.engine import make_engine
from meltica.storage.errors import classify_database_error


async def _reconcile(
    account: str, trigger: str, db_url: str, config_file: str | None, policy: ReconcilePolicy
) -> ReconciliationReport:
    settings = load_settings(config_file=config_file)
    adapter = adapter_for_account(settings, account)  # a configuration error first: terminal, no retry
    engine = make_engine(db_url)
    try:
        try:
            kill_switch = KillSwitch(KillSwitchStore(engine))
        except OperationalError as exc:
            await adapter.close()
            raise classify_database_error(exc, "reconciliation: reading the kill switch", engine) or exc from None
        try:
            await adapter.connect()
            return await reconcile_account(
                engine, adapter, account=account, policy=policy, kill_switch=kill_switch, trigger=trigger
            )
        finally:
            await adapter.close()
    finally:
        engine.dispose()


@meltica_task("reconciliation", task_run_name="reconcile {account} ({trigger})")
def reconcile_one(
    account: str, trigger: str, db_url: str, config_file: str | None, policy: ReconcilePolicy
) -> dict[str, Any]:
    report = asyncio.run(_reconcile(account, trigger, db_url, config_file, policy))
    return {
        "run_id": str(report.run_id),
        "account": report.account,
        "status": report.status,
        "markdown": markdown(report),
        **report.summary(),
    }


def _run_name() -> str:
    parameters = flow_run.parameters
    accounts = parameters.get("accounts") or []
    return f"reconcile ({parameters.get('trigger', 'schedule')}): {', '.join(accounts) or 'every account'}"


@flow(name="reconcile", flow_run_name=_run_name)
def reconcile(
    accounts: list[str] | None = None,
    trigger: str = "schedule",
    config_file: str | None = None,
    database: str | None = None,
    policy: ReconcilePolicy | None = None,
) -> list[dict[str, Any]]:
    """Reconcile ``accounts`` (default: every configured account); one markdown artifact lists the
    discrepancies of all of them. Fails (after storing what it could) if any account failed.

    Args:
        accounts: Accounts to reconcile; empty: every configured account with an exchange.
        trigger: What started the run (schedule, manual, cli); stored with the reconciliation.
        config_file: Configuration file on the worker; empty: the one set at deploy time (MELTICA_CONFIG).
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
        policy: Reconciliation policy (symbols, tolerances, actions); empty: the defaults.
    """
    scrub_secrets_in_logs()
    config_file = config_file_of(config_file)
    settings = load_settings(config_file=config_file)
    names = accounts or [a.name for a in settings.accounts]
    db_url = database or database_url()
    chosen = policy or ReconcilePolicy()
    results: list[dict[str, Any]] = []
    failures: list[tuple[str, BaseException]] = []
    for name in names:
        state = reconcile_one(name, trigger, db_url, config_file, chosen, return_state=True)
        try:
            results.append(state.result())
        except MelticaError as exc:
            failures.append((name, exc))
    body = "\n".join(r["markdown"] for r in results) or "No account reconciled.\n"
    if failures:
        body += "\n### Failed\n\n" + "\n".join(f"- `{name}`: {type(exc).__name__}: {exc}" for name, exc in failures)
    # One row per account: what `meltica reconcile --now --watch` prints and decides its exit status on.
    create_table_artifact(
        key="reconciliation-summary",
        table=[
            {
                "account": r["account"],
                "status": r["status"],
                "discrepancies": r["discrepancies"],
                "adopted": r["adopted"],
                "halted": ", ".join(r["halted_scopes"]),
                "error": "",
            }
            for r in results
        ]
        + [
            {"account": name, "status": "failed", "discrepancies": "", "adopted": "", "halted": "", "error": str(exc)}
            for name, exc in failures
        ],
        description=f"Reconciliation ({trigger}): one row per account",
    )
    create_markdown_artifact(
        key="reconciliation",
        markdown=body,
        description=f"Reconciliation ({trigger}) of {', '.join(names) or 'no account'}",
    )
    if failures:
        raise failures[0][1]
    return results
