"""A maintained L2 (price-aggregated) order book and Binance's diff-depth sync procedure.

``L2Book`` keeps one ``dict`` per side (float price → (price as given, quantity as given)) plus a
sorted list of the float prices, kept in order with ``bisect``. An update that changes the quantity of
an existing level is one dict store; a new or removed level is one ``bisect`` plus a C-level list
insert/delete. The best level is the end of the list (O(1)) and top-N is a slice, which is what a
stream consumer reads after every update. Prices and quantities are ``Decimal`` at the API: they are
converted when read, and stored as the venue sent them (string or ``Decimal``), so nothing is lost.

Float keys are safe as identities: every decimal price with at most 15 significant digits maps to a
distinct float and back, and two spellings of one price ("20377.00", "20377.0") map to the same key.

``DepthSynchronizer`` implements Binance's documented procedure for a local book
(spot: https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams, "How to manage a
local order book correctly"; USDⓈ-M futures: the same with ``pu``):

1. buffer diffs from the stream; 2. fetch a snapshot (``lastUpdateId`` L);
3. drop buffered diffs with ``u`` <= L (spot) / ``u`` < L (futures);
4. the first applied diff must straddle the snapshot: ``U`` <= L+1 <= ``u`` (spot), ``U`` <= L <= ``u``
   (futures);
5. afterwards each diff must continue the previous one: ``U`` == previous ``u`` + 1 (spot) or
   ``pu`` == previous ``u`` (futures, when the message carries ``pu``).

A break raises ``BookGapError`` (a ``RetryableError``); the caller re-snapshots with ``resync()``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn

from meltica.domain.enums import Side
from meltica.domain.market_data import BookLevel, OrderBookSnapshot
from meltica.errors import BookGapError

PriceLike = Decimal | str | float | int
LevelInput = Sequence[Any]  # (price, quantity[, ...]) as a venue sends it

_ZERO = 0.0


def _dec(value: PriceLike) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


class _Side:
    """One side of the book. ``keys`` ascending; the best level is ``keys[-1]`` for bids, ``keys[0]`` for asks."""

    __slots__ = ("keys", "levels", "prices")

    def __init__(self) -> None:
        self.levels: dict[float, tuple[PriceLike, PriceLike]] = {}
        self.keys: list[float] = []
        self.prices: dict[float, Decimal] = {}  # Decimal of a live level's price, made on first read

    def price_of(self, key: float) -> Decimal:
        price = self.prices.get(key)
        if price is None:
            price = self.prices[key] = _dec(self.levels[key][0])
        return price

    def set(self, price: PriceLike, quantity: PriceLike) -> None:
        key = float(price)
        levels = self.levels
        if float(quantity) == _ZERO:
            if key in levels:
                del levels[key]
                keys = self.keys
                del keys[bisect_left(keys, key)]
                self.prices.pop(key, None)
            return
        if key not in levels:
            insort(self.keys, key)
        levels[key] = (price, quantity)

    def load(self, levels: Iterable[LevelInput]) -> None:
        self.levels = {}
        self.prices = {}
        for level in levels:
            price, quantity = level[0], level[1]
            if float(quantity) != _ZERO:
                self.levels[float(price)] = (price, quantity)
        self.keys = sorted(self.levels)

    def clear(self) -> None:
        self.levels = {}
        self.keys = []
        self.prices = {}


class L2Book:
    """Price-aggregated order book of one market. Not thread-safe; one owner task feeds it."""

    __slots__ = ("_asks", "_bids", "exchange", "sequence", "symbol", "ts")

    def __init__(self, exchange: str = "venue", symbol: str = "?") -> None:
        self.exchange = exchange
        self.symbol = symbol
        self._bids = _Side()
        self._asks = _Side()
        self.sequence: int | None = None  # last applied venue update id
        self.ts: datetime | None = None

    # --- writing ---------------------------------------------------------------------------

    def apply_snapshot(
        self,
        bids: Iterable[LevelInput],
        asks: Iterable[LevelInput],
        sequence: int | None = None,
        ts: datetime | None = None,
    ) -> None:
        """Replace the whole book."""
        self._bids.load(bids)
        self._asks.load(asks)
        self.sequence = sequence
        self.ts = ts

    def update_bid(self, price: PriceLike, quantity: PriceLike) -> None:
        """Set one bid level; quantity 0 removes it."""
        self._bids.set(price, quantity)

    def update_ask(self, price: PriceLike, quantity: PriceLike) -> None:
        self._asks.set(price, quantity)

    def update(self, side: Side, price: PriceLike, quantity: PriceLike) -> None:
        (self._bids if side is Side.BUY else self._asks).set(price, quantity)

    def apply_levels(self, bids: Iterable[LevelInput], asks: Iterable[LevelInput]) -> None:
        """Apply changed levels (absolute quantities, 0 removes) without any sequence check."""
        bid_set, ask_set = self._bids.set, self._asks.set
        for level in bids:
            bid_set(level[0], level[1])
        for level in asks:
            ask_set(level[0], level[1])

    def clear(self) -> None:
        self._bids.clear()
        self._asks.clear()
        self.sequence = None

    # --- reading ---------------------------------------------------------------------------

    def best_bid_price_float(self) -> float | None:
        """Hot-path read: the best bid as a float key (no Decimal conversion)."""
        keys = self._bids.keys
        return keys[-1] if keys else None

    def best_ask_price_float(self) -> float | None:
        keys = self._asks.keys
        return keys[0] if keys else None

    def best_bid(self) -> tuple[Decimal, Decimal] | None:
        keys = self._bids.keys
        if not keys:
            return None
        price, quantity = self._bids.levels[keys[-1]]
        return _dec(price), _dec(quantity)

    def best_ask(self) -> tuple[Decimal, Decimal] | None:
        keys = self._asks.keys
        if not keys:
            return None
        price, quantity = self._asks.levels[keys[0]]
        return _dec(price), _dec(quantity)

    def best_bid_price(self) -> Decimal | None:
        keys = self._bids.keys
        return self._bids.price_of(keys[-1]) if keys else None

    def best_ask_price(self) -> Decimal | None:
        keys = self._asks.keys
        return self._asks.price_of(keys[0]) if keys else None

    def mid(self) -> Decimal | None:
        bid, ask = self.best_bid_price(), self.best_ask_price()
        if bid is None or ask is None:
            return None
        return (bid + ask) / 2

    def spread(self) -> Decimal | None:
        bid, ask = self.best_bid_price(), self.best_ask_price()
        if bid is None or ask is None:
            return None
        return ask - bid

    def is_crossed(self) -> bool:
        bid, ask = self.best_bid_price_float(), self.best_ask_price_float()
        return bid is not None and ask is not None and bid >= ask

    def bids(self, depth: int | None = None) -> list[tuple[Decimal, Decimal]]:
        """Best first (descending price)."""
        keys = self._bids.keys
        chosen = keys[::-1] if depth is None else keys[: -depth - 1 : -1]
        levels = self._bids.levels
        return [(_dec(levels[k][0]), _dec(levels[k][1])) for k in chosen]

    def asks(self, depth: int | None = None) -> list[tuple[Decimal, Decimal]]:
        """Best first (ascending price)."""
        keys = self._asks.keys
        chosen = keys if depth is None else keys[:depth]
        levels = self._asks.levels
        return [(_dec(levels[k][0]), _dec(levels[k][1])) for k in chosen]

    def top(self, depth: int) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        return self.bids(depth), self.asks(depth)

    @property
    def bid_count(self) -> int:
        return len(self._bids.keys)

    @property
    def ask_count(self) -> int:
        return len(self._asks.keys)

    def as_dicts(self) -> tuple[dict[Decimal, Decimal], dict[Decimal, Decimal]]:
        """Both sides as price → quantity (for comparisons and tests)."""
        return (
            {_dec(p): _dec(q) for p, q in self._bids.levels.values()},
            {_dec(p): _dec(q) for p, q in self._asks.levels.values()},
        )

    def snapshot(self, depth: int | None = None, ts: datetime | None = None) -> OrderBookSnapshot:
        """An immutable domain snapshot (built without re-validation: the book keeps the invariants)."""
        when = ts or self.ts or datetime.now(UTC)
        return OrderBookSnapshot.model_construct(
            exchange=self.exchange,
            symbol=self.symbol,
            bids=tuple(BookLevel.model_construct(price=p, quantity=q) for p, q in self.bids(depth)),
            asks=tuple(BookLevel.model_construct(price=p, quantity=q) for p, q in self.asks(depth)),
            sequence=self.sequence,
            ts=when,
        )

    def __repr__(self) -> str:
        return (
            f"L2Book({self.exchange}:{self.symbol} bids={self.bid_count} asks={self.ask_count} "
            f"best={self.best_bid_price_float()}/{self.best_ask_price_float()} seq={self.sequence})"
        )


class DepthDiff:
    """One diff-depth message: Binance ``U`` (first id), ``u`` (last id), ``pu`` (futures), levels."""

    __slots__ = ("asks", "bids", "first_id", "last_id", "prev_last_id", "ts")

    def __init__(
        self,
        first_id: int,
        last_id: int,
        bids: Sequence[LevelInput],
        asks: Sequence[LevelInput],
        prev_last_id: int | None = None,
        ts: datetime | None = None,
    ) -> None:
        self.first_id = first_id
        self.last_id = last_id
        self.bids = bids
        self.asks = asks
        self.prev_last_id = prev_last_id
        self.ts = ts

    @classmethod
    def from_binance(cls, message: dict[str, Any]) -> DepthDiff:
        """From a raw ``depthUpdate`` event (spot or futures)."""
        pu = message.get("pu")
        return cls(
            first_id=int(message["U"]),
            last_id=int(message["u"]),
            bids=message.get("b") or (),
            asks=message.get("a") or (),
            prev_last_id=None if pu is None else int(pu),
        )


class DepthSynchronizer:
    """Keeps an ``L2Book`` in sync with a diff stream per Binance's procedure (module docstring).

    ``futures`` selects the futures variant of steps 3–5; ``None`` decides per message (a diff that
    carries ``pu`` is a futures diff). Diffs that arrive before the snapshot are buffered (at most
    ``max_buffer``; older ones are dropped, which the straddle check then reports as a gap).
    """

    def __init__(self, book: L2Book, *, futures: bool | None = None, max_buffer: int = 10_000) -> None:
        self.book = book
        self.futures = futures
        self._buffer: deque[DepthDiff] = deque(maxlen=max_buffer)
        self._synced = False  # first diff after the snapshot has been applied
        self._has_snapshot = False
        self.gaps = 0

    @property
    def needs_snapshot(self) -> bool:
        return not self._has_snapshot

    @property
    def in_sync(self) -> bool:
        return self._has_snapshot and self._synced

    def _is_futures(self, diff: DepthDiff) -> bool:
        return self.futures if self.futures is not None else diff.prev_last_id is not None

    def resync(self) -> None:
        """Forget the book; buffer diffs until the next ``on_snapshot``."""
        self._has_snapshot = False
        self._synced = False
        self._buffer.clear()

    def on_snapshot(
        self,
        bids: Iterable[LevelInput],
        asks: Iterable[LevelInput],
        last_update_id: int,
        ts: datetime | None = None,
    ) -> int:
        """Load the snapshot and replay the buffered diffs; returns how many were applied.

        Raises ``BookGapError`` if the buffer does not bridge to the snapshot (the snapshot is newer
        than every buffered diff is fine: the next live diff is checked then).
        """
        self.book.apply_snapshot(bids, asks, last_update_id, ts)
        self._has_snapshot = True
        self._synced = False
        buffered = list(self._buffer)
        self._buffer.clear()
        applied = 0
        for index, diff in enumerate(buffered):
            try:
                if self._apply(diff):
                    applied += 1
            except BookGapError:
                self._buffer.extend(buffered[index + 1 :])  # the offending diff is already re-buffered
                raise
        return applied

    def on_diff(self, diff: DepthDiff) -> bool:
        """Apply (True), drop as already contained in the snapshot (False), or buffer (False)."""
        if not self._has_snapshot:
            self._buffer.append(diff)
            return False
        return self._apply(diff)

    def _apply(self, diff: DepthDiff) -> bool:
        book = self.book
        last = book.sequence
        assert last is not None  # set by on_snapshot
        futures = self._is_futures(diff)
        if not self._synced:
            if diff.last_id < last or (not futures and diff.last_id == last):
                return False  # already in the snapshot
            target = last if futures else last + 1
            if not diff.first_id <= target <= diff.last_id:
                self._gap(diff, f"first diff [{diff.first_id}, {diff.last_id}] does not straddle snapshot {last}")
            self._synced = True
        elif futures and diff.prev_last_id is not None:
            if diff.prev_last_id != last:
                if diff.last_id <= last:
                    return False  # a duplicate of something applied
                self._gap(diff, f"diff pu={diff.prev_last_id} does not continue u={last}")
        elif diff.first_id != last + 1:
            if diff.last_id <= last:
                return False
            self._gap(diff, f"diff U={diff.first_id} does not continue u={last}")
        book.apply_levels(diff.bids, diff.asks)
        book.sequence = diff.last_id
        if diff.ts is not None:
            book.ts = diff.ts
        return True

    def _gap(self, diff: DepthDiff, problem: str) -> NoReturn:
        self.gaps += 1
        expected = self.book.sequence
        self.resync()
        self._buffer.append(diff)  # it may bridge the next snapshot
        raise BookGapError(
            f"{self.book.exchange}:{self.book.symbol} order book gap: {problem}; re-snapshot needed",
            exchange=self.book.exchange,
            symbol=self.book.symbol,
            last_sequence=expected,
        )
