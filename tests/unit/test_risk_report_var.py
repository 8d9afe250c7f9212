"""Historical VaR / ES and the drawdown helper of the risk report, against numpy and by hand."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from meltica.errors import DataValidationError
from meltica.reporting.risk_report import _max_drawdown, historical_var_es


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_var_es_are_numpy_quantile_and_tail_mean(confidence: float) -> None:
    pnl = np.random.default_rng(7).standard_t(4, 1000) * 100
    var, es = historical_var_es(pnl, confidence)
    q = np.quantile(pnl, 1 - confidence)
    assert var == -q
    assert es == -pnl[pnl <= q].mean()
    assert es >= var


def test_var_of_a_small_sample_by_hand() -> None:
    # quantile(0.05) of 1..5 minus 3 = -2 + 0.2 * (−1 − −2) = −1.8; the tail is just −2.
    assert historical_var_es([-2.0, -1.0, 0.0, 1.0, 2.0], 0.95) == pytest.approx((1.8, 2.0))
    with pytest.raises(DataValidationError):
        historical_var_es([], 0.95)


def test_max_drawdown_is_the_worst_fall_from_a_running_peak() -> None:
    values = [Decimal(v) for v in (0, 5, 2, 8, 1, 3)]
    assert _max_drawdown(values) == Decimal(7)
    assert _max_drawdown([Decimal(0), Decimal(1)]) == Decimal(0)
