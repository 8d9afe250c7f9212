"""Per-account request budgets on top of ccxt's own ``enableRateLimit`` throttle.

ccxt spaces requests per exchange *instance*; a venue counts per account (API key) and per IP, and
several adapters (market data, execution, reconciliation) may share one account. ``RateBudgets``
hands out one ``TokenBucket`` per ``(exchange, account)`` so they all draw on the same budget, and a
429/418 answer pauses the whole bucket for as long as the venue said (``Retry-After``).

Clock and sleep are injected (monotonic seconds / ``asyncio.sleep``) so tests run without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class BudgetConfig:
    """``rate`` tokens per second refill up to ``burst``; a request costs its ``weight`` tokens."""

    rate: float = 10.0
    burst: float = 20.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError("rate and burst must be > 0")


class TokenBucket:
    """An async token bucket with a venue-imposed pause (``penalize``)."""

    def __init__(self, config: BudgetConfig, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self._tokens = config.burst
        self._updated = clock()
        self._blocked_until = 0.0
        self._lock = asyncio.Lock()
        self.waited = 0.0  # total seconds spent waiting (observability)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.config.burst, self._tokens + elapsed * self.config.rate)
        self._updated = now

    def delay_for(self, weight: float = 1.0) -> float:
        """Seconds a request of ``weight`` would wait now (0 when it can go at once)."""
        now = self._clock()
        self._refill(now)
        pause = max(0.0, self._blocked_until - now)
        missing = max(0.0, min(weight, self.config.burst) - self._tokens)
        return max(pause, missing / self.config.rate)

    async def acquire(self, weight: float = 1.0) -> None:
        async with self._lock:  # FIFO: one waiter computes its delay at a time
            while True:
                delay = self.delay_for(weight)
                if delay <= 0:
                    self._tokens -= min(weight, self.config.burst)
                    return
                self.waited += delay
                await self._sleep(delay)

    def penalize(self, seconds: float) -> None:
        """The venue said "slow down" for ``seconds``: nothing from this budget goes before then."""
        now = self._clock()
        self._blocked_until = max(self._blocked_until, now + max(0.0, seconds))
        self._tokens = 0.0
        self._updated = now

    @property
    def blocked_for(self) -> float:
        return max(0.0, self._blocked_until - self._clock())


class RateBudgets:
    """One bucket per ``(exchange, account)``; pass one instance to every adapter of a process."""

    def __init__(
        self,
        default: BudgetConfig | None = None,
        per_exchange: dict[str, BudgetConfig] | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.default = default or BudgetConfig()
        self.per_exchange = dict(per_exchange or {})
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def bucket(self, exchange: str, account: str) -> TokenBucket:
        key = (exchange, account)
        if key not in self._buckets:
            config = self.per_exchange.get(exchange, self.default)
            self._buckets[key] = TokenBucket(config, clock=self._clock, sleep=self._sleep)
        return self._buckets[key]
