"""Retry policy shared by the venue adapters and the order manager: which errors are retried, and how
long to wait between tries (bounded attempts, exponential backoff with jitter).

Only the retryable family of ``meltica.errors`` is ever retried (DESIGN.md §5); an ambiguous failure of
an order *placement* is resolved by client order id before any re-send — that rule lives in the OMS and
the ccxt adapter, this module only says how often and how long. It imports nothing heavy, so backtests
on the paper venue never load ccxt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meltica.errors import RateLimitError, is_retryable


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    ``max_attempts`` counts every try of one venue call, the first included. ``resolve_attempts``
    bounds the look-ups by client order id after an ambiguous placement (timeout, lost answer, 5xx).
    """

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_rate_limit_wait: float = 60.0  # a longer Retry-After surfaces the RateLimitError instead
    resolve_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.resolve_attempts < 1:
            raise ValueError("max_attempts and resolve_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Wait before retry ``attempt`` (1-based): uniform in [c/2, c], c = min(max_delay, base·2^(n-1))."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return rng.uniform(ceiling / 2, ceiling)

    def wait_for(self, error: BaseException, attempt: int, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after ``error`` on try ``attempt``, or ``None``: do not retry."""
        if not is_retryable(error) or attempt >= self.max_attempts:
            return None
        if isinstance(error, RateLimitError) and error.retry_after is not None:
            if error.retry_after > self.max_rate_limit_wait:
                return None
            return error.retry_after
        return self.delay(attempt, rng)


NO_RETRY = RetryPolicy(max_attempts=1, base_delay=0.0, max_delay=0.0, resolve_attempts=1)
