"""The ingest's closed-bar sequencing (gaps refetched by REST, no bar twice), its stale-stream statuses,
and what it subscribes from a live settings file. The venue here is a plain list of recorded-shape
bars behind ``fetch_ohlcv`` (the REST half of an adapter), no ccxt involved."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from meltica.config.settings import MelticaSettings
from meltica.domain import Bar
from meltica.errors import ConfigurationError, NetworkError
from meltica.live.ingest_setup import ingest_from_settings, ingest_problems, ingest_subscriptions
from meltica.live.marketdata import MarketDataIngest, Subscription, _Liveness
from meltica.live.processor import Outgoing
from meltica.messaging.schemas import MarketStatus

T0 = datetime(2024, 1, 1, tzinfo=UTC)
M = timedelta(minutes=1)


def bar(minute: int, close: str = "10", volume: str = "1") -> Bar:
    c = Decimal(close)
    return Bar(
        exchange="binance", symbol="BTC/USDT", timeframe="1m", ts=T0 + minute * M,
        open=c, high=c, low=c, close=c, volume=Decimal(volume),
    )  # fmt: skip


class RestBars:
    """``fetch_ohlcv`` over a fixed list of closed bars (what the venue's REST would answer)."""

    def __init__(self, bars: list[Bar], fail: bool = False) -> None:
        self.bars = bars
        self.fail = fail
        self.calls: list[tuple[datetime | None, int | None]] = []

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since: datetime | None = None, limit: int | None = None
    ) -> list[Bar]:
        self.calls.append((since, limit))
        if self.fail:
            raise NetworkError("venue unreachable")
        rows = [b for b in self.bars if since is None or b.ts >= since]
        return rows[: limit or 500]


def sequence(ingest: MarketDataIngest, venue: RestBars, closed: Bar, next_minute: int) -> list[Bar]:
    return asyncio.run(ingest._sequence(venue, closed, T0 + (next_minute - 1) * M))  # type: ignore[arg-type]


def test_contiguous_bars_pass_through_and_none_is_published_twice() -> None:
    ingest = MarketDataIngest({})
    venue = RestBars([])
    assert sequence(ingest, venue, bar(0), 1) == [bar(0)]
    assert sequence(ingest, venue, bar(1), 2) == [bar(1)]
    assert sequence(ingest, venue, bar(1, "11"), 2) == []  # the same minute again
    assert ingest.duplicate_bars == 1 and venue.calls == [] and ingest.gaps == []
    assert ingest.last_bar("binance:BTC/USDT") == T0 + M


def test_a_gap_is_fetched_by_rest_published_in_order_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    rest = [bar(m, close=str(100 + m)) for m in range(10)]
    ingest = MarketDataIngest({})
    venue = RestBars(rest)
    assert sequence(ingest, venue, bar(0), 1) == [bar(0)]
    # the stream's next kline opens at minute 5: bars 1-4 never came, and bar 1's last update may be lost
    with caplog.at_level(logging.WARNING):
        out = sequence(ingest, venue, bar(1, "7"), 5)
    assert out == rest[1:5]  # 1 from REST too: the stream skipped klines after it
    gap = ingest.gaps[-1]
    assert (gap.start, gap.end, gap.missing, gap.fetched, gap.error) == (T0 + 2 * M, T0 + 5 * M, 3, 3, None)
    assert "gap in 1m bars from 2024-01-01T00:02:00+00:00 to 2024-01-01T00:05:00+00:00: 3 missing, 3 fetched" in (
        caplog.text
    )
    # the next closed bar continues after the gap; the venue is asked only for what was missing
    assert sequence(ingest, venue, bar(5), 6) == [bar(5)]
    assert venue.calls == [(T0 + M, 4)]
    # a closed bar more than one bar after the last published one (a restart that lost the stream)
    assert sequence(ingest, venue, bar(8), 9) == [*rest[6:8], bar(8)]


def test_after_a_reconnect_the_closing_bar_comes_from_rest() -> None:
    rest = [bar(m, close=str(100 + m)) for m in range(5)]
    ingest = MarketDataIngest({})
    venue = RestBars(rest)
    sequence(ingest, venue, bar(0), 1)
    ingest._wanted.add(Subscription("binance", "BTC/USDT", "candles.1m"))
    ingest._on_stream_fault("binance", NetworkError("closed", operation="watch_ohlcv", symbol="BTC/USDT"))
    assert sequence(ingest, venue, bar(1, "7"), 2) == [rest[1]]  # the stream's bar 1 may miss its last update
    assert sequence(ingest, venue, bar(2, "7"), 3) == [bar(2, "7")]  # once only


def test_restart_resumes_after_the_last_bar_on_the_topic_and_rest_failure_is_loud(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rest = [bar(m, close=str(100 + m)) for m in range(10)]
    ingest = MarketDataIngest({}, last_bars={"binance:BTC/USDT": T0 + 3 * M})
    assert sequence(ingest, RestBars(rest), bar(3), 4) == []  # published before the restart
    assert sequence(ingest, RestBars(rest), bar(6), 7) == [*rest[4:6], bar(6)]
    failing = MarketDataIngest({}, last_bars={"binance:BTC/USDT": T0 + 3 * M})
    with caplog.at_level(logging.ERROR):
        assert sequence(failing, RestBars(rest, fail=True), bar(6), 7) == [bar(6)]
    assert failing.gaps[-1].error is not None and "REST failed: NetworkError: venue unreachable" in caplog.text
    assert sequence(failing, RestBars(rest), bar(7), 8) == [bar(7)]  # the gap is reported once, not refetched


def test_a_silent_stream_goes_stale_and_recovers_with_statuses_on_control() -> None:
    now = [T0]
    sub = Subscription("binance", "BTC/USDT", "trades")
    ingest = MarketDataIngest({}, stale_after=10, heartbeat=5, clock=lambda: now[0])
    published: list[Outgoing] = []

    async def emit(out: Outgoing) -> None:
        published.append(out)

    async def scenario() -> None:
        ingest._emit = emit
        ingest._liveness[sub] = _Liveness(since=T0)  # subscribed at T0 (what _launch records)

        async def one_trade() -> AsyncIterator[Any]:
            yield bar(0)

        assert not ingest.is_stale(sub)
        now[0] = T0 + timedelta(seconds=10)
        assert ingest.is_stale(sub)  # nothing at all since subscribing
        async for _ in ingest._tap(sub, one_trade()):
            pass
        assert not ingest.is_stale(sub)
        live = ingest._liveness[sub]
        live.stale = True
        await ingest._publish_status(sub, live)
        await ingest.unsubscribe(sub)

    asyncio.run(scenario())
    statuses = [o.value for o in published]
    assert all(isinstance(s, MarketStatus) for s in statuses)
    assert [o.key for o in published] == ["market:binance:BTC/USDT"] * 2
    first, last = statuses
    assert first.stale and first.stream == "trades" and first.last_event_ts == T0
    assert first.last_received_ts == T0 + timedelta(seconds=10) and first.heartbeat_s == 5
    assert not last.subscribed and not last.stale  # unsubscribed: the gate forgets the stream


def _settings(**live: Any) -> MelticaSettings:
    return MelticaSettings.model_validate(
        {
            "accounts": [
                {"name": "paper1", "exchange": "paper"},
                {"name": "spot", "exchange": "binance", "sandbox": True, "api_key": "k", "api_secret": "s"},
                {"name": "okx1", "exchange": "okx"},
            ],
            "live": {
                "instances": [
                    {"instance_id": "a", "strategy": "momentum", "account": "spot", "symbols": ["BTC/USDT"]},
                    {
                        "instance_id": "b",
                        "strategy": "momentum",
                        "account": "spot",
                        "symbols": ["BTC/USDT", "ETH/USDT"],
                    },
                ],
                **live,
            },
        }
    )


def test_subscriptions_come_from_the_instances_and_the_streams_setting() -> None:
    settings = _settings(ingest={"streams": ["trades", "klines"], "stale_after_s": 20})
    assert [str(s) for s in ingest_subscriptions(settings)] == [
        "binance:BTC/USDT/candles.1m",
        "binance:BTC/USDT/trades",
        "binance:ETH/USDT/candles.1m",
        "binance:ETH/USDT/trades",
    ]
    ingest = ingest_from_settings(settings)
    assert ingest.stale_after == 20 and ingest.refetch_gaps
    adapter = ingest._factory("binance") if ingest._factory else None  # built, not connected
    assert adapter is not None and adapter.exchange_id == "binance"
    assert not getattr(adapter, "exchange").apiKey  # public data: no credentials in the ingest  # noqa: B009
    assert getattr(adapter, "streams").stale_after == 40  # noqa: B009  (twice stale_after_s)
    with pytest.raises(ConfigurationError, match="no configured account on exchange 'kraken'"):
        ingest._factory("kraken") if ingest._factory else None


def test_klines_and_a_candles_stage_together_are_refused() -> None:
    settings = _settings(workers=[{"name": "w", "stages": ["candles", "strategies", "risk", "execution"]}])
    assert "both would publish md.candles.1m" in ingest_problems(settings)[0]
    with pytest.raises(ConfigurationError, match=r"md\.candles\.1m"):
        ingest_from_settings(settings)
    assert (
        ingest_problems(_settings(workers=[{"name": "w", "stages": ["candles"]}], ingest={"streams": ["trades"]})) == []
    )


def test_meltica_live_ingest_check_prints_the_subscriptions(tmp_path: Any) -> None:
    import yaml
    from typer.testing import CliRunner

    from meltica.cli import app

    config = tmp_path / "live.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "accounts": [{"name": "emu", "exchange": "binance", "emulator_url": "http://127.0.0.1:8090"}],
                "live": {
                    "topic_prefix": "t.",
                    "instances": [
                        {"instance_id": "a", "strategy": "momentum", "account": "emu", "symbols": ["BTC/USDT"]}
                    ],
                    "ingest": {"streams": ["klines", "ticker"], "stale_after_s": 12},
                },
            }
        )
    )
    result = CliRunner().invoke(app, ["live", "ingest", "--config", str(config), "--check"])
    assert result.exit_code == 0, result.output
    assert "binance:BTC/USDT  candles.1m → md.candles.1m  (http://127.0.0.1:8090)" in result.output
    assert "binance:BTC/USDT  ticker     → md.ticker" in result.output
    assert "stale after 12s" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"live": {"instances": []}}))
    refused = CliRunner().invoke(app, ["live", "ingest", "--config", str(bad), "--check"])
    assert refused.exit_code != 0 and "no strategy instance" in refused.output
