"""The time-series path's decisions, without a database: refresh windows, detection, version floor, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from meltica.config.settings import MelticaSettings
from meltica.errors import InfrastructureError
from meltica.storage import timeseries
from meltica.storage.timeseries import Flavour


def _t(hour: int, minute: int) -> datetime:
    return datetime(2022, 1, 3, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("first", "last", "window"),
    [
        (_t(11, 5), _t(12, 4), (_t(11, 0), _t(13, 0))),  # an ingest window across an hour boundary
        (_t(11, 5), _t(11, 6), (_t(11, 0), _t(12, 0))),  # two bars: still one whole bucket
        (_t(11, 0), _t(11, 59), (_t(11, 0), _t(12, 0))),
        (_t(23, 1), _t(23, 59), (_t(23, 0), _t(0, 0) + timedelta(days=1))),
    ],
)
def test_refresh_window_covers_every_hour_the_load_touched(
    first: datetime, last: datetime, window: tuple[datetime, datetime]
) -> None:
    start, end = timeseries.hour_window(first, last)
    assert (start, end) == window
    assert start is not None and end is not None
    assert end - start >= timedelta(hours=1)  # never smaller than one bucket


def test_refresh_window_keeps_open_ends_open() -> None:
    assert timeseries.hour_window(None, None) == (None, None)
    assert timeseries.hour_window(None, _t(11, 30)) == (None, _t(12, 0))


def test_refresh_window_of_a_naive_or_other_zone_time_is_utc() -> None:
    from zoneinfo import ZoneInfo

    local = datetime(2022, 1, 3, 12, 30, tzinfo=ZoneInfo("Europe/Berlin"))  # 11:30 UTC
    assert timeseries.hour_window(local, local) == (_t(11, 0), _t(12, 0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("timescaledb", True),
        ("pg_stat_statements,timescaledb", True),
        ('"$libdir/timescaledb"', True),
        ("timescaledb-2.28.3", True),
        ("", False),
        ("pg_stat_statements", False),
        ("timescaledb_toolkit", False),
    ],
)
def test_preload_list_detection(value: str, expected: bool) -> None:
    assert timeseries.preload_list_has_timescaledb(value) is expected


def test_versions_below_the_floor_are_refused_in_one_line() -> None:
    assert timeseries.parse_version("2.17.2") == (2, 17, 2)
    assert timeseries.parse_version("2.28.3-dev") == (2, 28, 3)
    for refused in ("2.17.2", "2.18.0", "1.7.5"):
        with pytest.raises(InfrastructureError, match=rf"TimescaleDB {refused} is older than 2\.18\.1") as info:
            timeseries.check_timescaledb_version(refused)
        assert "\n" not in str(info.value)
    for accepted in ("2.18.1", "2.28.3", "3.0.0"):
        timeseries.check_timescaledb_version(accepted)


def test_flavour_is_what_the_objects_are() -> None:
    # extension added after a plain-PostgreSQL migration: candles_1h is a materialized view -> plain path
    assert timeseries.decide_flavour("2.28.3", candles_1h_is_continuous=False) is Flavour.POSTGRES
    assert timeseries.decide_flavour(None, candles_1h_is_continuous=False) is Flavour.POSTGRES
    assert timeseries.decide_flavour("2.28.3", candles_1h_is_continuous=True) is Flavour.TIMESCALEDB
    with pytest.raises(InfrastructureError, match="older than"):
        timeseries.decide_flavour("2.17.2", candles_1h_is_continuous=True)


def test_no_hypertable_has_retention_unless_configured() -> None:
    assert MelticaSettings().storage.retention == {}
    assert not any(hasattr(spec, "retain_for") for spec in timeseries.HYPERTABLES)


def test_retention_settings_name_the_bad_field() -> None:
    ok = MelticaSettings(storage={"retention": {"trades": "365 days", "order_book_snapshots": "12 weeks"}})
    assert ok.storage.retention["trades"] == "365 days"
    with pytest.raises(ValidationError, match=r"storage\.retention[\s\S]*'fills' is not a time-series table"):
        MelticaSettings(storage={"retention": {"fills": "30 days"}})
    with pytest.raises(ValidationError, match=r"retention of trades must look like"):
        MelticaSettings(storage={"retention": {"trades": "forever"}})
