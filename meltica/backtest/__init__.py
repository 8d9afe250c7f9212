"""Backtesting: performance metrics, stored results and reports of backtest runs."""

from meltica.backtest.config import BacktestConfig, default_instrument
from meltica.backtest.context import BacktestContext
from meltica.backtest.engine import run_backtest
from meltica.backtest.metrics import Metrics, RoundTrip, compute_metrics, round_trips_from_fills
from meltica.backtest.report import write_report
from meltica.backtest.results import BacktestResult, EquityPoint, OrderRecord, detect_code_version
from meltica.marketdata.series import BarSeries

__all__ = [
    "BacktestConfig",
    "BacktestContext",
    "BacktestResult",
    "BarSeries",
    "EquityPoint",
    "Metrics",
    "OrderRecord",
    "RoundTrip",
    "compute_metrics",
    "default_instrument",
    "detect_code_version",
    "round_trips_from_fills",
    "run_backtest",
    "write_report",
]
