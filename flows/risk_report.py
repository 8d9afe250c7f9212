"""The daily risk report as a Prefect flow run (a thin shell over ``meltica.reporting.risk_report``).

Computes the report of one UTC day from the stored facts, stores its JSON in ``risk_state`` under
``risk_report:<day>``, writes ``risk-report-<day>.md`` / ``.json`` / ``.png`` under ``output_dir``, stores
those three as a report served by ``meltica reports serve`` and publishes the markdown as an artifact with the
chart embedded (a ``data:`` URI: the UI shows it) and links to the stored files under ``reports_url``. Without
``day`` it reports the day before the flow run's scheduled start (no wall-clock read in the core).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import config_file_of, embedded_png, scrub_secrets_in_logs
from flows._retry import meltica_task
from meltica.config import load_settings
from meltica.errors import ConfigurationError
from meltica.infra.postgres import database_url
from meltica.reporting.risk_report import build_risk_report, markdown, render_png, store_report
from meltica.reporting.stored import report_url, store_report_directory
from meltica.risk.limits import RiskConfig
from meltica.storage.engine import make_engine

# Stored reports (`meltica reports serve`) are named by a UUIDv5 of the day and the report's JSON: the same report
# is stored once, a report of the same day with other facts is another one.
_NAMESPACE = uuid.UUID("0b6f0c55-7d0e-4c1e-9a57-3f5b7d0a9c41")


def _report_day(day: date | None) -> date:
    if day is not None:
        return day
    scheduled = flow_run.scheduled_start_time
    if scheduled is None:
        raise ConfigurationError("no day given and no scheduled start to derive it from", field="day")
    previous: date = scheduled.date() - timedelta(days=1)
    return previous


def _limits(limits: dict[str, Any] | None, config_file: str | None) -> tuple[RiskConfig, str]:
    """The limits to measure utilisation against, and where they come from: ``limits`` when given, else the
    ``risk`` section of the configuration the trading runs with (``config_file``, else ``MELTICA_CONFIG``/
    ``MELTICA_ENV``'s file)."""
    if limits is not None:
        return RiskConfig.model_validate(limits), "the flow run's `limits` parameter"
    path = config_file_of(config_file)
    settings = load_settings(config_file=path)
    return settings.risk, f"the `risk` section of {path or f'the {settings.environment} configuration'}"


@meltica_task("risk report", task_run_name="risk report {day}")
def compute_report(
    day: date,
    db_url: str,
    output_dir: str,
    limits: dict[str, Any] | None,
    marks: dict[str, Any] | None,
    config_file: str | None = None,
) -> dict[str, Any]:
    risk, limits_source = _limits(limits, config_file)
    engine = make_engine(db_url)
    try:
        report = build_risk_report(engine, day, limits=risk, marks=marks)
        key = store_report(engine, report)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = render_png(report, out / f"risk-report-{day.isoformat()}.png")
        text = markdown(report, limits_source=limits_source)
        md = out / f"risk-report-{day.isoformat()}.md"
        md.write_text(markdown(report, chart_url=png.name, limits_source=limits_source), encoding="utf-8")
        js = out / f"risk-report-{day.isoformat()}.json"
        document = json.dumps(report.to_json(), indent=2) + "\n"
        js.write_text(document, encoding="utf-8")
        # Stored for `meltica reports serve`: the artifact links these, whatever happens to the worker's disk.
        report_id = uuid.uuid5(_NAMESPACE, f"{day.isoformat()}:{hashlib.sha256(document.encode()).hexdigest()}")
        names = (js.name, png.name, md.name)
        store_report_directory(engine, report_id, "risk", f"risk report {day.isoformat()}", out, names)
    finally:
        engine.dispose()
    return {
        "report_id": str(report_id),
        "report_files": list(names),
        "day": day.isoformat(),
        "risk_state_key": key,
        "markdown": text,
        "png": png.resolve().as_uri(),
        "markdown_file": md.resolve().as_uri(),
        "json_file": js.resolve().as_uri(),
        "breaches": len(report.breached_limits) + len(report.breaches),
        "limits_source": limits_source,
        "pnl": {line.account: str(line.pnl) for line in report.by_account},
    }


@flow(name="daily-risk-report", flow_run_name="risk report {day}")
def daily_risk_report(
    day: date | None = None,
    database: str | None = None,
    output_dir: str = "out/risk-reports",
    limits: dict[str, Any] | None = None,
    marks: dict[str, Any] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """The risk report of the UTC ``day`` (default: the day before the scheduled start).

    Args:
        day: The UTC day to report; empty: the day before the scheduled start.
        database: Database URL; empty: the configured database (MELTICA_DATABASE_URL). A password here is masked in
            Prefect's copy.
        output_dir: Directory on the worker for the report's files (relative: in the deployed checkout).
        limits: A risk configuration section to use instead of the configured one, e.g. {"max_gross_exposure": "50000"}.
        marks: Day-end prices by symbol, e.g. {"BTC/USDT": "43000"}; empty: the stored candles' closes.
        config_file: Configuration file whose risk section gives the limits; empty: the one set at deploy time
            (MELTICA_CONFIG).
    """
    scrub_secrets_in_logs()
    the_day = _report_day(day)
    summary: dict[str, Any] = compute_report(
        the_day, database or database_url(), output_dir, limits, marks, config_file
    )
    base = load_settings(config_file=config_file_of(config_file)).reports_url
    report_id = uuid.UUID(summary["report_id"])
    links = " · ".join(f"[{name}]({report_url(base, report_id, name)})" for name in summary["report_files"])
    create_markdown_artifact(
        key="risk-report",
        markdown=embedded_png(summary["png"], "risk report chart")
        + "\n\n"
        + summary["markdown"]
        + f"\n\nStored report (served by `meltica reports serve`): {links}\n",
        description=f"Daily risk report {the_day.isoformat()} (JSON in risk_state {summary['risk_state_key']})",
    )
    return summary
