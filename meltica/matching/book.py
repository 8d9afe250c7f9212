"""Price-level structures: recorded market liquidity, and resting user orders in time priority.

Prices are kept in an ascending list (``bisect``), so the best price is an index away and a level
insert/remove is one ``bisect`` plus a list insert — no scan of the book per event.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from decimal import Decimal
from typing import Generic, TypeVar

T = TypeVar("T")


class _Levels(Generic[T]):
    __slots__ = ("is_bid", "levels", "prices")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.prices: list[Decimal] = []  # ascending
        self.levels: dict[Decimal, T] = {}

    def __bool__(self) -> bool:
        return bool(self.prices)

    def best(self) -> Decimal | None:
        if not self.prices:
            return None
        return self.prices[-1] if self.is_bid else self.prices[0]

    def _insert_price(self, price: Decimal) -> None:
        i = bisect_left(self.prices, price)
        self.prices.insert(i, price)

    def _remove_price(self, price: Decimal) -> None:
        i = bisect_left(self.prices, price)
        if i < len(self.prices) and self.prices[i] == price:
            del self.prices[i]

    def prices_best_first(self) -> Iterator[Decimal]:
        return reversed(self.prices) if self.is_bid else iter(self.prices)

    def better_or_equal(self, price: Decimal, limit: Decimal) -> bool:
        """``price`` is at least as good as ``limit`` for this side's owner (higher bid, lower ask)."""
        return price >= limit if self.is_bid else price <= limit

    def clear(self) -> None:
        self.prices.clear()
        self.levels.clear()


class MarketSide(_Levels[Decimal]):
    """Recorded liquidity of one side: price → quantity."""

    def set(self, price: Decimal, quantity: Decimal) -> None:
        if quantity <= 0:
            if self.levels.pop(price, None) is not None:
                self._remove_price(price)
            return
        if price not in self.levels:
            self._insert_price(price)
        self.levels[price] = quantity

    def quantity(self, price: Decimal) -> Decimal:
        return self.levels.get(price, Decimal(0))


class OrderSide(_Levels["deque[T]"]):
    """Resting user orders of one side: price → FIFO queue (time priority)."""

    def append(self, price: Decimal, item: T) -> None:
        queue = self.levels.get(price)
        if queue is None:
            queue = deque()
            self.levels[price] = queue
            self._insert_price(price)
        queue.append(item)

    def remove(self, price: Decimal, item: T) -> None:
        queue = self.levels[price]
        queue.remove(item)
        if not queue:
            del self.levels[price]
            self._remove_price(price)

    def drop_level_if_empty(self, price: Decimal) -> None:
        queue = self.levels.get(price)
        if queue is not None and not queue:
            del self.levels[price]
            self._remove_price(price)
