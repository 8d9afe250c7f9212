"""Positions, PnL, balances, reservations, exposure and equity (contract: meltica/execution/README.md).

Plain Python, no Kafka and no Prefect: the same ``Portfolio`` runs in backtests, paper and live.
The rules (ledgers, fees, valuation currency, conservation) are in :mod:`meltica.portfolio.portfolio`.
"""

from meltica.portfolio.portfolio import (
    ACCOUNT_LEDGER,
    Exposure,
    Holding,
    PnL,
    Portfolio,
    Valuation,
    is_derivative,
    split_symbol,
)
from meltica.portfolio.store import PortfolioStore

__all__ = [
    "ACCOUNT_LEDGER",
    "Exposure",
    "Holding",
    "PnL",
    "Portfolio",
    "PortfolioStore",
    "Valuation",
    "is_derivative",
    "split_symbol",
]
