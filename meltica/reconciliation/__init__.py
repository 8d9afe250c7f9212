"""Reconciliation: what Meltica believes (database) against what each venue reports (no Prefect here).

``reconcile_account(engine, adapter, account=..., policy=ReconcilePolicy(), kill_switch=..., trigger=...)``
→ ``ReconciliationReport`` (stored in ``reconciliation_runs`` / ``reconciliation_discrepancies``);
``markdown(report)`` renders it. The Prefect shell is ``flows/reconcile.py``; ``meltica reconcile --local``
runs ``meltica.reconciliation.local`` in-process; the execution stage runs
``meltica.reconciliation.startup.startup_hook(engine, settings)`` per account before its first order.
"""

from meltica.reconciliation.markdown import markdown, markdown_all
from meltica.reconciliation.policy import (
    DEFAULT_ACTIONS,
    KIND_OF,
    Action,
    Case,
    DiscrepancyKind,
    ReconcilePolicy,
)
from meltica.reconciliation.reconcile import Discrepancy, ReconciliationReport, reconcile_account

__all__ = [
    "DEFAULT_ACTIONS",
    "KIND_OF",
    "Action",
    "Case",
    "Discrepancy",
    "DiscrepancyKind",
    "ReconcilePolicy",
    "ReconciliationReport",
    "markdown",
    "markdown_all",
    "reconcile_account",
]
