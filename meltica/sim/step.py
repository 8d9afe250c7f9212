"""``BarStep``: how a bar moves a simulated venue's matching engine — the one copy of it.

A bar is stepped in three parts, each publishing what the engine did (``publish``: the paper venue's
``dispatch`` or the emulator's user streams) before it returns; the caller moves its clock first and
settles its user stream after:

1. ``open`` — at the bar's open time: with a fill model's ``bar_volume_share`` ``q`` and the bar's
   volume ``v``, the synthetic book holds ``q × v`` (split over its levels, at least one lot a level:
   volume-dependent slippage, a remainder beyond it expires); then the open is printed as a trade of no
   size (a stop the gap crossed triggers there and fills at the open's price — the worse one);
2. ``path`` — at the bar's close time: the intrabar path (open → nearer extreme → other extreme → close,
   stops before limit fills: conservative), resting orders filling at most ``q × v`` along it;
3. ``expire`` — GTD orders whose time has passed expire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

from meltica.matching import MatchingEngine, MatchResult

_ZERO = Decimal(0)


class BarStep:
    """Steps one ``MatchingEngine`` through bars (module docstring); ``publish`` hands on its results."""

    __slots__ = ("base_model", "engine", "publish")

    def __init__(self, engine: MatchingEngine, publish: Callable[[MatchResult], None]) -> None:
        self.engine = engine
        self.publish = publish
        # The configured fill model: each bar's volume share sizes a copy of it, never it.
        self.base_model = engine.fill_model

    def size_book(
        self, symbol: str, volume: Decimal, *, default_share: Decimal | None = None, whole_lots: bool = False
    ) -> None:
        """Let the synthetic book hold the fill model's ``bar_volume_share`` (else ``default_share``; neither:
        unchanged) of ``volume``, split over its levels, at least one lot a level (``whole_lots``: rounded
        down to lots — the emulator's replayed depth)."""
        base = self.base_model
        share = base.bar_volume_share if base.bar_volume_share is not None else default_share
        if share is None:
            return
        engine = self.engine
        lot = engine.instrument(symbol).step_size
        level = volume * share / base.synthetic_levels
        if whole_lots:
            level = level // lot * lot
        level = max(level, lot)
        if engine.fill_model.synthetic_level_quantity != level:
            engine.fill_model = replace(base, synthetic_level_quantity=level)

    def open(self, symbol: str, price: Decimal, volume: Decimal | None) -> MatchResult:
        """The bar's open: the book sized from ``volume`` (when given), the open printed."""
        if volume is not None:
            self.size_book(symbol, volume)
        result = self.engine.on_trade(symbol, price, _ZERO)
        self.publish(result)
        return result

    def path(
        self, symbol: str, open_: Decimal, high: Decimal, low: Decimal, close: Decimal, volume: Decimal
    ) -> MatchResult:
        """The bar's intrabar path (the caller's clock at the bar's close: the fills are stamped with it)."""
        result = self.engine.on_bar(symbol, open_, high, low, close, volume)
        self.publish(result)
        return result

    def expire(self) -> bool:
        """GTD orders past their time expire; whether any did (published then)."""
        expired = self.engine.advance()
        if not expired.order_updates:
            return False
        self.publish(expired)
        return True
