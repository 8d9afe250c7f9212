"""``market_making``: post-only quotes on both sides of the mid, spread from volatility, inventory skew.

* Mid: the order book's (``on_book``) when the strategy gets books, else the bar close.
* Half-spread: ``spread_vol_mult`` × realized volatility of the last ``vol_period`` bar returns, clamped
  to ``[min_half_spread_bps, max_half_spread_bps]``.
* Inventory skew: the quote centre moves against the position — ``inventory_skew`` × half-spread ×
  position / ``max_inventory`` — so a long book quotes lower (sells sooner, buys later).
* At ``max_inventory`` (either sign) the side that would add to it is not quoted.
* Quotes are cancelled and replaced when the mid moved more than ``requote_bps`` since they were placed,
  or when one side was filled; they are post-only (a quote that would take is refused by the venue).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import Field, model_validator

from meltica.domain import Bar, Order, OrderBookSnapshot, OrderType, PriceRounding, Side
from meltica.strategies.base import Strategy, StrategyContext, StrategyParams
from meltica.strategies.indicators import RealizedVolatility
from meltica.strategies.registry import register_strategy


class MarketMakingParams(StrategyParams):
    symbol: str = Field("BTC/USDT", description="market to quote")
    quantity: Decimal = Field(Decimal("0.01"), gt=0, description="size of each quote in base units")
    max_inventory: Decimal = Field(Decimal("0.05"), gt=0, description="absolute position limit in base units")
    vol_period: int = Field(30, ge=2, le=5000, description="bars of returns in the realized volatility")
    spread_vol_mult: float = Field(1.5, gt=0, le=100, description="half-spread in units of per-bar volatility")
    min_half_spread_bps: float = Field(5.0, gt=0, le=1000)
    max_half_spread_bps: float = Field(100.0, gt=0, le=5000)
    inventory_skew: float = Field(1.0, ge=0, le=10, description="centre shift at max inventory, in half-spreads")
    requote_bps: float = Field(3.0, ge=0, le=1000, description="re-quote when the mid moved more than this")

    @model_validator(mode="after")
    def _check(self) -> MarketMakingParams:
        if self.min_half_spread_bps > self.max_half_spread_bps:
            raise ValueError("min_half_spread_bps must not exceed max_half_spread_bps")
        if self.quantity > self.max_inventory:
            raise ValueError("quantity must not exceed max_inventory")
        return self


@register_strategy
class MarketMaking(Strategy[MarketMakingParams]):
    name: ClassVar[str] = "market_making"
    Params: ClassVar[type[MarketMakingParams]] = MarketMakingParams

    def __init__(self, params: MarketMakingParams, ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        self.vol = RealizedVolatility(params.vol_period)
        self.bid_coid: str | None = None
        self.ask_coid: str | None = None
        self.quoted_mid = math.nan  # mid the live quotes were placed around
        self.best_bid = math.nan  # from the book, when there is one
        self.best_ask = math.nan

    def on_bar(self, bar: Bar) -> None:
        if bar.symbol != self.params.symbol:
            return
        close = float(bar.close)
        self.vol.update(close)
        if math.isnan(self.best_bid):
            self._quote(close)

    def on_book(self, book: OrderBookSnapshot) -> None:
        if book.symbol != self.params.symbol or not book.bids or not book.asks:
            return
        self.best_bid = float(book.bids[0].price)
        self.best_ask = float(book.asks[0].price)
        self._quote((self.best_bid + self.best_ask) / 2)

    def on_order(self, order: Order) -> None:
        if not order.status.is_terminal:
            return
        if order.client_order_id == self.bid_coid:
            self.bid_coid = None
        elif order.client_order_id == self.ask_coid:
            self.ask_coid = None

    def half_spread(self, mid: float) -> float:
        p = self.params
        bps = p.min_half_spread_bps
        if self.vol.ready:
            bps = max(bps, min(p.max_half_spread_bps, p.spread_vol_mult * self.vol.value * 10_000))
        return mid * bps / 10_000

    def _quote(self, mid: float) -> None:
        p = self.params
        moved = math.isnan(self.quoted_mid) or abs(mid - self.quoted_mid) > self.quoted_mid * p.requote_bps / 10_000
        if not moved and self.bid_coid is not None and self.ask_coid is not None:
            return
        inventory = self.ctx.position(p.symbol).quantity
        half = self.half_spread(mid)
        center = mid - p.inventory_skew * half * float(inventory / p.max_inventory)
        inst = self.ctx.instrument(p.symbol)
        # Passive rounding: the bid down, the ask up; never inside the book we can see.
        bid = inst.round_price(repr(min(center - half, mid - half * 0.5)), mode=PriceRounding.DOWN)
        ask = inst.round_price(repr(max(center + half, mid + half * 0.5)), mode=PriceRounding.UP)
        if not math.isnan(self.best_ask):
            bid = min(bid, inst.round_price(repr(self.best_ask), mode=PriceRounding.DOWN) - inst.tick_size)
            ask = max(ask, inst.round_price(repr(self.best_bid), mode=PriceRounding.UP) + inst.tick_size)
        if moved or self.bid_coid is None:
            self._replace(Side.BUY, bid, inventory + p.quantity <= p.max_inventory)
        if moved or self.ask_coid is None:
            self._replace(Side.SELL, ask, inventory - p.quantity >= -p.max_inventory)
        self.quoted_mid = mid

    def _replace(self, side: Side, price: Decimal, allowed: bool) -> None:
        p = self.params
        current = self.bid_coid if side is Side.BUY else self.ask_coid
        if current is not None:
            self.ctx.cancel(current)
        coid = (
            self.ctx.submit(
                symbol=p.symbol, side=side, type=OrderType.LIMIT, quantity=p.quantity, price=price, post_only=True
            )
            if allowed and price > 0
            else None
        )
        if side is Side.BUY:
            self.bid_coid = coid
        else:
            self.ask_coid = coid

    def on_stop(self) -> None:
        self.ctx.cancel_all(self.params.symbol)

    def snapshot_state(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            **super().snapshot_state(),
            "vol": self.vol.state(),
            "bid_coid": self.bid_coid,
            "ask_coid": self.ask_coid,
            "quoted_mid": f(self.quoted_mid),
            "best_bid": f(self.best_bid),
            "best_ask": f(self.best_ask),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        def f(x: Any) -> float:
            return math.nan if x is None else float(x)

        super().restore_state(state)
        self.vol = RealizedVolatility.from_state(state["vol"])
        self.bid_coid = state["bid_coid"]
        self.ask_coid = state["ask_coid"]
        self.quoted_mid = f(state["quoted_mid"])
        self.best_bid = f(state["best_bid"])
        self.best_ask = f(state["best_ask"])
