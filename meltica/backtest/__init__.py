"""Backtesting: performance metrics, stored results and reports of backtest runs."""

from meltica.backtest.metrics import Metrics, RoundTrip, compute_metrics, round_trips_from_fills
from meltica.backtest.report import write_report
from meltica.backtest.results import BacktestResult, EquityPoint, OrderRecord, detect_code_version

__all__ = [
    "BacktestResult",
    "EquityPoint",
    "Metrics",
    "OrderRecord",
    "RoundTrip",
    "compute_metrics",
    "detect_code_version",
    "round_trips_from_fills",
    "write_report",
]
