from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meltica.domain import Balance, Timeframe, ms_to_utc, to_decimal, utc_to_ms


def test_float_goes_through_str() -> None:
    assert to_decimal(0.1) == Decimal("0.1")
    assert to_decimal("1e-05") == Decimal("0.00001")
    assert to_decimal(3) == Decimal(3)


@pytest.mark.parametrize("bad", ["nan", "Infinity", float("nan"), float("inf"), True, "abc", None, [1]])
def test_non_numbers_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - message asserted elsewhere
        to_decimal(bad)


def test_negative_quantities_are_refused() -> None:
    with pytest.raises(ValidationError, match="must be >= 0"):
        Balance(asset="USDT", free="-1")
    assert Balance(asset="USDT", free="1.5", locked=2).total == Decimal("3.5")


def test_ms_round_trip_is_exact() -> None:
    ts = ms_to_utc(1_634_942_465_856)
    assert ts == datetime(2021, 10, 22, 22, 41, 5, 856_000, tzinfo=UTC)
    assert utc_to_ms(ts) == 1_634_942_465_856
    with pytest.raises(TypeError):
        ms_to_utc(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**13), max_value=10**14))
def test_ms_round_trip_property(ms: int) -> None:
    assert utc_to_ms(ms_to_utc(ms)) == ms


def test_naive_datetime_is_refused_and_offsets_become_utc() -> None:
    with pytest.raises(ValueError, match="naive"):
        utc_to_ms(datetime(2024, 1, 1))  # noqa: DTZ001 - the point of the test
    plus2 = datetime(2024, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert utc_to_ms(plus2) == utc_to_ms(datetime(2024, 1, 1, tzinfo=UTC))


def test_timeframe_parse_and_multiples() -> None:
    assert Timeframe.parse("1m").delta == timedelta(minutes=1)
    assert Timeframe.parse("4h").seconds == 14_400
    assert Timeframe.parse("1d").delta == timedelta(days=1)
    assert Timeframe.parse("5m").is_multiple_of("1m")
    assert Timeframe.parse("1h").is_multiple_of(Timeframe.parse("15m"))
    assert not Timeframe.parse("5m").is_multiple_of("3m")
    for bad in ("1M", "0m", "m", "1y", "", "1.5h"):
        with pytest.raises(ValueError, match="invalid timeframe"):
            Timeframe.parse(bad)


def test_timeframe_floor() -> None:
    ts = datetime(2024, 3, 5, 13, 47, 12, 500, tzinfo=UTC)
    assert Timeframe.parse("15m").floor(ts) == datetime(2024, 3, 5, 13, 45, tzinfo=UTC)
    assert Timeframe.parse("1d").floor(ts) == datetime(2024, 3, 5, tzinfo=UTC)
    assert Timeframe.parse("1w").floor(ts) == datetime(2024, 3, 4, tzinfo=UTC)  # a Monday
