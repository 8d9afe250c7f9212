"""Reports computed from the stored facts (no Prefect here: ``flows/`` publishes them)."""

from meltica.reporting.risk_report import (
    RiskReport,
    build_risk_report,
    historical_var_es,
    load_stored_report,
    markdown,
    render_png,
    store_report,
)

__all__ = [
    "RiskReport",
    "build_risk_report",
    "historical_var_es",
    "load_stored_report",
    "markdown",
    "render_png",
    "store_report",
]
