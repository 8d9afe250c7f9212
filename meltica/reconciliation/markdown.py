"""A reconciliation report as markdown (the flow's artifact, the CLI's output)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meltica.reconciliation.reconcile import ReconciliationReport


def _cell(value: object) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _brief(view: Mapping[str, Any] | None) -> str:
    if view is None:
        return "—"
    keys = ("status", "filled_quantity", "quantity", "total", "side", "price")
    parts = [f"{k}={view[k]}" for k in keys if view.get(k) is not None]
    return ", ".join(parts) or "present"


def markdown(report: ReconciliationReport) -> str:
    """One account's run: header, counts, and one table row per discrepancy."""
    lines = [
        f"### Reconciliation of `{report.account}` on {report.exchange} — {report.status}",
        "",
        f"run `{report.run_id}` · trigger {report.trigger} · started {report.started_at.isoformat()}"
        + (f" · finished {report.finished_at.isoformat()}" if report.finished_at else ""),
        "",
        f"orders checked {report.orders_checked} · venue open orders {report.open_orders_checked} · "
        f"venue trades checked {report.trades_checked} · "
        f"symbols {', '.join(report.symbols) or '—'} · balances "
        + (f"compared with {report.balance_baseline}" if report.balances_compared else "not compared (no local view)"),
        "",
    ]
    if report.error:
        lines += [f"**Error:** {_cell(report.error)}", ""]
    if report.halted_scopes:
        lines += [f"**Kill switch engaged (halt):** {', '.join(f'`{s}`' for s in report.halted_scopes)}", ""]
    if not report.discrepancies:
        lines.append("No discrepancies.")
        return "\n".join(lines) + "\n"
    lines += [
        "| kind | case | subject | strategy | Meltica | venue | action |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in report.discrepancies:
        lines.append(
            f"| {d.kind.value} | {d.case.value} | `{_cell(d.subject)}` | {_cell(d.strategy)} | "
            f"{_cell(_brief(d.local))} | {_cell(_brief(d.venue))} | {_cell(d.outcome)} |"
        )
    return "\n".join(lines) + "\n"


def markdown_all(reports: Iterable[ReconciliationReport]) -> str:
    return "\n".join(markdown(r) for r in reports)
