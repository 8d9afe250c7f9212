"""Streaming indicators: float arithmetic (DESIGN.md §4 allows floats here), O(1) per update.

Each indicator takes one value (or one bar's high/low/close) per ``update`` and keeps only what the next
update needs: an exponential average keeps one float, windowed statistics keep a ring buffer of the
window. No pandas and no allocation per update, so a backtest can push millions of bars through them.
Definitions match pandas (tested against it): ``EMA`` is ``ewm(span=n, adjust=False)``, ``SMA`` and
``RollingStats`` are ``rolling(n)`` (``std`` with ``ddof``), ``ATR`` is Wilder's (``ewm(alpha=1/n,
adjust=False)`` of the true range, the first true range being high − low).

``state()`` / ``from_state()`` give a JSON-serialisable snapshot so a strategy's persisted state can
carry its indicators across a restart and continue bit-for-bit.
"""

from __future__ import annotations

import math
from typing import Any


class EMA:
    """Exponential moving average, ``alpha = 2 / (period + 1)``, seeded with the first value."""

    __slots__ = ("_alpha", "count", "period", "value")

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError("EMA period must be >= 1")
        self.period = period
        self._alpha = 2.0 / (period + 1)
        self.value = math.nan
        self.count = 0

    @property
    def ready(self) -> bool:
        """True once ``period`` values were seen (before that the seed still dominates)."""
        return self.count >= self.period

    def update(self, x: float) -> float:
        if self.count == 0:
            self.value = x
        else:
            self.value += self._alpha * (x - self.value)
        self.count += 1
        return self.value

    def state(self) -> dict[str, Any]:
        return {"period": self.period, "value": None if self.count == 0 else self.value, "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EMA:
        ema = cls(int(state["period"]))
        ema.count = int(state["count"])
        ema.value = math.nan if state["value"] is None else float(state["value"])
        return ema


class RollingStats:
    """Mean and standard deviation over the last ``period`` values (a ring buffer and running sums).

    The window's sum and sum of squared deviations are updated in O(1) (Welford's update for a sliding
    window); every ``period`` × 64 updates they are recomputed from the buffer so float drift cannot
    build up over a long backtest.
    """

    __slots__ = ("_buf", "_i", "_m2", "_mean", "_since_exact", "count", "ddof", "period")

    def __init__(self, period: int, ddof: int = 1) -> None:
        if period < 1:
            raise ValueError("RollingStats period must be >= 1")
        if ddof not in (0, 1):
            raise ValueError("ddof must be 0 or 1")
        self.period = period
        self.ddof = ddof
        self._buf = [0.0] * period
        self._i = 0
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._since_exact = 0

    @property
    def ready(self) -> bool:
        return self.count >= self.period

    def update(self, x: float) -> None:
        buf = self._buf
        i = self._i
        if self.count < self.period:
            self.count += 1
            delta = x - self._mean
            self._mean += delta / self.count
            self._m2 += delta * (x - self._mean)
        else:
            old = buf[i]
            old_mean = self._mean
            self._mean = old_mean + (x - old) / self.period
            self._m2 += (x - old) * (x - self._mean + old - old_mean)
            self._since_exact += 1
            if self._since_exact >= self.period * 64:
                buf[i] = x
                self._recompute()
        buf[i] = x
        self._i = i + 1 if i + 1 < self.period else 0

    def _recompute(self) -> None:
        n = self.count
        mean = math.fsum(self._buf) / n
        self._mean = mean
        self._m2 = math.fsum((v - mean) ** 2 for v in self._buf)
        self._since_exact = 0

    @property
    def mean(self) -> float:
        return self._mean if self.count else math.nan

    @property
    def variance(self) -> float:
        n = self.count - self.ddof
        if n <= 0:
            return math.nan
        return max(self._m2, 0.0) / n

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def zscore(self, x: float) -> float:
        """``(x − mean) / std``; 0 when the window is flat, NaN before two values."""
        std = self.std
        if math.isnan(std):
            return math.nan
        if std == 0.0:
            return 0.0
        return (x - self._mean) / std

    def bollinger(self, k: float) -> tuple[float, float, float]:
        """(lower, middle, upper) = mean ∓ k·std."""
        mean, std = self.mean, self.std
        return mean - k * std, mean, mean + k * std

    def state(self) -> dict[str, Any]:
        # The buffer in window order, oldest first: enough to rebuild everything exactly.
        window = self._buf[: self.count] if self.count < self.period else self._buf[self._i :] + self._buf[: self._i]
        return {
            "period": self.period,
            "ddof": self.ddof,
            "window": window,
            "mean": self._mean,
            "m2": self._m2,
            "since_exact": self._since_exact,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RollingStats:
        stats = cls(int(state["period"]), int(state["ddof"]))
        window = [float(v) for v in state["window"]]
        stats.count = len(window)
        stats._buf[: len(window)] = window
        stats._i = len(window) % stats.period
        stats._mean = float(state["mean"])
        stats._m2 = float(state["m2"])
        stats._since_exact = int(state["since_exact"])
        return stats


class SMA:
    """Simple moving average over the last ``period`` values (ring buffer + running sum)."""

    __slots__ = ("_stats",)

    def __init__(self, period: int) -> None:
        self._stats = RollingStats(period, ddof=0)

    @property
    def period(self) -> int:
        return self._stats.period

    @property
    def ready(self) -> bool:
        return self._stats.ready

    @property
    def value(self) -> float:
        return self._stats.mean

    def update(self, x: float) -> float:
        self._stats.update(x)
        return self._stats.mean

    def state(self) -> dict[str, Any]:
        return self._stats.state()

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SMA:
        sma = cls(int(state["period"]))
        sma._stats = RollingStats.from_state(state)
        return sma


class ATR:
    """Average true range, Wilder's smoothing (``alpha = 1 / period``), seeded with the first bar's range."""

    __slots__ = ("_alpha", "_prev_close", "count", "period", "value")

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError("ATR period must be >= 1")
        self.period = period
        self._alpha = 1.0 / period
        self.value = math.nan
        self.count = 0
        self._prev_close = math.nan

    @property
    def ready(self) -> bool:
        return self.count >= self.period

    def update(self, high: float, low: float, close: float) -> float:
        if self.count == 0:
            tr = high - low
            self.value = tr
        else:
            pc = self._prev_close
            tr = max(high - low, abs(high - pc), abs(low - pc))
            self.value += self._alpha * (tr - self.value)
        self._prev_close = close
        self.count += 1
        return self.value

    def state(self) -> dict[str, Any]:
        empty = self.count == 0
        return {
            "period": self.period,
            "value": None if empty else self.value,
            "prev_close": None if empty else self._prev_close,
            "count": self.count,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ATR:
        atr = cls(int(state["period"]))
        atr.count = int(state["count"])
        atr.value = math.nan if state["value"] is None else float(state["value"])
        atr._prev_close = math.nan if state["prev_close"] is None else float(state["prev_close"])
        return atr


class RealizedVolatility:
    """Standard deviation of the last ``period`` log returns (per bar; sample std, ``ddof=1``).

    Multiply by ``sqrt(bars per year)`` to annualise; the market maker uses it per bar, as a fraction of
    price, to size its spread.
    """

    __slots__ = ("_prev", "_stats")

    def __init__(self, period: int) -> None:
        self._stats = RollingStats(period, ddof=1)
        self._prev = math.nan

    @property
    def period(self) -> int:
        return self._stats.period

    @property
    def ready(self) -> bool:
        return self._stats.ready

    @property
    def value(self) -> float:
        return self._stats.std

    def update(self, price: float) -> float:
        prev = self._prev
        self._prev = price
        if prev == prev and prev > 0.0 and price > 0.0:  # prev == prev: not NaN
            self._stats.update(math.log(price / prev))
        return self._stats.std

    def state(self) -> dict[str, Any]:
        return {"stats": self._stats.state(), "prev": None if math.isnan(self._prev) else self._prev}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RealizedVolatility:
        stats = RollingStats.from_state(state["stats"])
        vol = cls(stats.period)
        vol._stats = stats
        vol._prev = math.nan if state["prev"] is None else float(state["prev"])
        return vol
