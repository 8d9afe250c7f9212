"""The shared test kit (tests/kit) is used, not copied: no test module defines its own clock or process wrapper
around ``subprocess.Popen`` with a log file."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.kit import ManualClock, spot_instrument

TESTS = Path(__file__).resolve().parents[1]


def _modules() -> list[Path]:
    return [p for p in TESTS.rglob("*.py") if "kit" not in p.relative_to(TESTS).parts]


def test_no_test_module_defines_its_own_clock() -> None:
    copies = [str(p.relative_to(TESTS)) for p in _modules() if re.search(r"^class \w*Clock\b", p.read_text(), re.M)]
    assert copies == [], f"use tests.kit.ManualClock instead: {copies}"


def test_the_manual_clock_reads_what_the_test_set_and_ticks_when_asked() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    clock = ManualClock(start)
    assert clock() == clock() == start
    assert clock.advance(minutes=2) == start + timedelta(minutes=2)
    ticking = ManualClock(start, tick=timedelta(seconds=1))
    assert [ticking(), ticking()] == [start + timedelta(seconds=1), start + timedelta(seconds=2)]
    with pytest.raises(ValueError, match="aware"):
        ManualClock(datetime(2024, 1, 1))  # noqa: DTZ001 - the naive time is the point


def test_a_spot_instrument_has_the_filters_asked_for() -> None:
    perp = spot_instrument("BTC/USDT:USDT", "binance", step_size="0.001", min_notional=None)
    assert (perp.base, perp.quote, perp.exchange) == ("BTC", "USDT", "binance")
    assert perp.min_quantity == perp.step_size == Decimal("0.001")
    assert perp.min_notional is None
    assert spot_instrument(min_quantity=None).min_quantity is None
