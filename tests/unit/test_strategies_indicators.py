"""Streaming indicators against pandas on the shipped real BTC perpetual 1m bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meltica.strategies.indicators import ATR, EMA, SMA, RealizedVolatility, RollingStats

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(DATA, nrows=6000)


def _close(a: list[float], b: pd.Series, *, skip: int = 0, rel: float = 1e-9, abs_: float = 1e-9) -> None:
    expected = b.to_numpy()
    got = np.array(a)
    assert len(got) == len(expected)
    mask = ~np.isnan(expected)
    mask[:skip] = False
    assert mask.sum() > 0
    np.testing.assert_allclose(got[mask], expected[mask], rtol=rel, atol=abs_)


@pytest.mark.parametrize("period", [2, 12, 26, 200])
def test_ema_matches_pandas_ewm(frame: pd.DataFrame, period: int) -> None:
    ema = EMA(period)
    values = [ema.update(x) for x in frame["close"].tolist()]
    _close(values, frame["close"].ewm(span=period, adjust=False).mean())
    assert ema.ready


@pytest.mark.parametrize("period", [1, 5, 20, 500])
def test_sma_matches_pandas_rolling_mean(frame: pd.DataFrame, period: int) -> None:
    sma = SMA(period)
    values = [sma.update(x) for x in frame["close"].tolist()]
    _close(values, frame["close"].rolling(period).mean(), skip=period - 1)


@pytest.mark.parametrize(("period", "ddof"), [(20, 1), (20, 0), (3, 1), (300, 1)])
def test_rolling_std_zscore_bollinger_match_pandas(frame: pd.DataFrame, period: int, ddof: int) -> None:
    stats = RollingStats(period, ddof=ddof)
    means, stds, zs, uppers = [], [], [], []
    for x in frame["close"].tolist():
        stats.update(x)
        means.append(stats.mean)
        stds.append(stats.std)
        zs.append(stats.zscore(x))
        uppers.append(stats.bollinger(2.0)[2])
    roll = frame["close"].rolling(period)
    mean, std = roll.mean(), roll.std(ddof=ddof)
    _close(means, mean, skip=period - 1)
    # A flat window's std is float noise around 0 in both (pandas' own is ~1e-5 on prices ~47,000).
    _close(stds, std, skip=period - 1, rel=1e-6, abs_=1e-3)
    # z-scores where the window is not (almost) flat: there both are the same finite number.
    z = ((frame["close"] - mean) / std).where(std > 0.01)
    _close(zs, z, skip=period - 1, rel=1e-5, abs_=1e-6)
    _close(uppers, mean + 2 * std, skip=period - 1, rel=1e-9, abs_=1e-3)


def test_rolling_stats_stays_exact_over_a_long_run(frame: pd.DataFrame) -> None:
    # More than period × 64 updates: the periodic exact recomputation runs several times.
    stats = RollingStats(5)
    closes = frame["close"].tolist()
    for x in closes:
        stats.update(x)
    tail = closes[-5:]
    assert stats.mean == pytest.approx(sum(tail) / 5, rel=1e-12)
    assert stats.std == pytest.approx(float(np.std(tail, ddof=1)), rel=1e-6)


@pytest.mark.parametrize("period", [14, 50])
def test_atr_matches_wilder_via_pandas(frame: pd.DataFrame, period: int) -> None:
    atr = ATR(period)
    values = [atr.update(h, lo, c) for h, lo, c in frame[["high", "low", "close"]].itertuples(index=False)]
    prev = frame["close"].shift(1)
    tr = pd.concat([frame["high"] - frame["low"], (frame["high"] - prev).abs(), (frame["low"] - prev).abs()], axis=1)
    tr = tr.max(axis=1)
    tr.iloc[0] = frame["high"].iloc[0] - frame["low"].iloc[0]
    _close(values, tr.ewm(alpha=1 / period, adjust=False).mean())


@pytest.mark.parametrize("period", [10, 60])
def test_realized_volatility_matches_pandas(frame: pd.DataFrame, period: int) -> None:
    vol = RealizedVolatility(period)
    values = [vol.update(x) for x in frame["close"].tolist()]
    expected = np.log(frame["close"]).diff().rolling(period).std()
    _close(values, expected, skip=period, rel=1e-6, abs_=1e-10)


def test_state_round_trip_through_json_continues_bit_for_bit(frame: pd.DataFrame) -> None:
    closes = frame["close"].tolist()
    rows = list(frame[["high", "low", "close"]].itertuples(index=False))
    makers = [
        (lambda: EMA(20), EMA.from_state, lambda i, x: i.update(x)),
        (lambda: SMA(20), SMA.from_state, lambda i, x: i.update(x)),
        (lambda: RealizedVolatility(30), RealizedVolatility.from_state, lambda i, x: i.update(x)),
    ]
    for make, restore, step in makers:
        a = make()
        b = make()
        for x in closes[:1000]:
            step(a, x)
            step(b, x)
        b = restore(json.loads(json.dumps(b.state())))
        for x in closes[1000:2000]:
            assert step(a, x) == step(b, x)
    a_atr, b_atr = ATR(14), ATR(14)
    for r in rows[:500]:
        a_atr.update(*r)
        b_atr.update(*r)
    b_atr = ATR.from_state(json.loads(json.dumps(b_atr.state())))
    for r in rows[500:900]:
        assert a_atr.update(*r) == b_atr.update(*r)
    s1, s2 = RollingStats(20), RollingStats(20)
    for x in closes[:7]:  # window not yet full
        s1.update(x)
        s2.update(x)
    s2 = RollingStats.from_state(json.loads(json.dumps(s2.state())))
    for x in closes[7:3000]:
        s1.update(x)
        s2.update(x)
        assert (s1.mean, s1.std) == (s2.mean, s2.std)


def test_indicators_before_data() -> None:
    assert math.isnan(EMA(3).value)
    assert math.isnan(RollingStats(3).std)
    assert math.isnan(RollingStats(3).zscore(1.0))
    flat = RollingStats(3)
    for _ in range(3):
        flat.update(5.0)
    assert flat.zscore(5.0) == 0.0
    with pytest.raises(ValueError, match="period"):
        EMA(0)
