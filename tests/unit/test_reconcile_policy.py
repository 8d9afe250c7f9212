"""Reconciliation policy and report rendering (no database, no venue)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meltica.reconciliation import (
    DEFAULT_ACTIONS,
    KIND_OF,
    Action,
    Case,
    Discrepancy,
    DiscrepancyKind,
    ReconcilePolicy,
    ReconciliationReport,
    markdown,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_case_has_a_kind_and_a_default_action() -> None:
    assert set(KIND_OF) == set(Case) == set(DEFAULT_ACTIONS)
    assert {k.value for k in KIND_OF.values()} == {
        "missing_locally", "missing_on_venue", "state_mismatch", "quantity_mismatch", "balance_drift",
    }  # fmt: skip


def test_default_policy_adopts_safe_cases_and_halts_unexplained_exposure() -> None:
    policy = ReconcilePolicy()
    assert policy.action_for(Case.VENUE_CLOSED) is Action.ADOPT
    assert policy.action_for(Case.FILL_MISSING_LOCALLY) is Action.ADOPT
    assert policy.action_for(Case.FILL_UNKNOWN_ORDER) is Action.HALT
    assert policy.action_for(Case.ORDER_UNKNOWN_LOCALLY) is Action.HALT
    assert policy.action_for(Case.VENUE_OPEN_LOCAL_CLOSED) is Action.HALT
    assert policy.action_for(Case.BALANCE_DRIFT) is Action.REPORT


def test_policy_overrides_by_case_or_name_and_refuses_adopting_what_has_no_venue_fact() -> None:
    policy = ReconcilePolicy(actions={Case.VENUE_CLOSED: Action.REPORT, "balance_drift": "halt"}).validate()
    assert policy.action_for(Case.VENUE_CLOSED) is Action.REPORT
    assert policy.action_for(Case.BALANCE_DRIFT) is Action.HALT
    with pytest.raises(ValueError, match="cannot be adopted"):
        ReconcilePolicy(actions={"balance_drift": "adopt"}).validate()
    with pytest.raises(ValueError, match="no_such_case"):
        ReconcilePolicy(actions={"no_such_case": "report"}).validate()


def test_tolerance_per_asset_with_a_default() -> None:
    policy = ReconcilePolicy(balance_tolerance={"USDT": Decimal("0.5")}, default_balance_tolerance=Decimal(0))
    assert policy.tolerance("USDT") == Decimal("0.5")
    assert policy.tolerance("BTC") == 0


def test_markdown_lists_discrepancies_and_halts() -> None:
    report = ReconciliationReport(
        run_id=uuid.uuid4(), account="main", exchange="binance", trigger="schedule", started_at=T0, status="completed"
    )
    assert "No discrepancies." in markdown(report)
    report.discrepancies.append(
        Discrepancy(
            DiscrepancyKind.BALANCE_DRIFT,
            Case.BALANCE_DRIFT,
            "balance:USDT",
            {"total": "10"},
            {"total": "12|x"},
            Action.REPORT,
            "reported",
            T0,
        )
    )
    report.halted_scopes.append("account:main")
    text = markdown(report)
    assert "| balance_drift | balance_drift | `balance:USDT` |" in text
    assert "total=12\\|x" in text
    assert "`account:main`" in text
    assert report.summary()["by_kind"] == {"balance_drift": 1}
    assert report.discrepancies[0].stored_action == "reported (balance_drift)"


def test_duplicate_client_order_id_is_halted_by_default_and_cannot_be_adopted() -> None:
    assert KIND_OF[Case.DUPLICATE_CLIENT_ORDER_ID] is DiscrepancyKind.MISSING_LOCALLY
    assert ReconcilePolicy().action_for(Case.DUPLICATE_CLIENT_ORDER_ID) is Action.HALT
    with pytest.raises(ValueError, match="cannot be adopted"):
        ReconcilePolicy(actions={"duplicate_client_order_id": "adopt"}).validate()


def test_local_ledger_rolls_spot_fills_forward_per_leg_with_fees() -> None:
    from types import SimpleNamespace

    from meltica.reconciliation.reconcile import _ledger_moves

    def leg(side: str, fee: str, fee_currency: str | None, symbol: str = "BTC/USDT") -> SimpleNamespace:
        return SimpleNamespace(
            symbol=symbol,
            side=side,
            price=Decimal(100),
            quantity=Decimal(2),
            fee=Decimal(fee),
            fee_currency=fee_currency,
        )

    # a self-trade: both legs move the balances back, both pay their fee
    moved = _ledger_moves([leg("buy", "0.002", "BTC"), leg("sell", "0.2", "USDT"), leg("buy", "1", "USDT", "X/Y:Y")])
    assert moved == {"BTC": Decimal("-0.002"), "USDT": Decimal("-0.2")}


def test_reconcilable_accounts_skip_paper_and_refuse_unknown_names() -> None:
    from meltica.config.settings import MelticaSettings
    from meltica.errors import ConfigurationError
    from meltica.reconciliation.local import reconcilable_accounts

    settings = MelticaSettings.model_validate(
        {
            "environment": "paper",
            "trading_mode": "paper",
            "accounts": [{"name": "sim", "exchange": "paper"}, {"name": "main", "exchange": "binance"}],
        }
    )
    assert reconcilable_accounts(settings) == ["main"]
    assert reconcilable_accounts(settings, ["sim", "sim"]) == ["sim"]
    with pytest.raises(ConfigurationError, match="no account named 'nope'"):
        reconcilable_accounts(settings, ["nope"])


def test_reconcile_refuses_now_and_local_together() -> None:
    from typer.testing import CliRunner

    from meltica.cli import app

    result = CliRunner().invoke(app, ["reconcile", "--now", "--local"])
    assert result.exit_code == 2
    assert "not both" in result.output


def test_every_runs_on_its_interval_and_ends_with_a_failed_run() -> None:
    import asyncio

    from meltica.reconciliation.startup import every

    slept: list[float] = []
    runs: list[int] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> None:
        runs.append(len(runs))
        if len(runs) == 3:
            raise RuntimeError("venue down")

    with pytest.raises(RuntimeError, match="venue down"):
        asyncio.run(every(900.0, run, sleep=sleep))
    assert (slept, runs) == ([900.0, 900.0, 900.0], [0, 1, 2])
    asyncio.run(every(0, run, sleep=sleep))  # 0: no periodic reconciliation
    assert len(runs) == 3
