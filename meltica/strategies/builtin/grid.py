"""``grid``: resting limit orders on a fixed price grid around a centre; each fill re-arms the next level.

Levels sit at ``centre + k × step`` for ``k`` in ``-levels … +levels``, ``step`` an absolute
price or ``step_pct`` percent of the centre (the centre is ``center`` or the first close). A buy that
fills at level ``k`` places a sell at level ``k + 1``; a sell that fills at ``k`` places a buy at ``k − 1``:
each round trip earns one step. ``mode="long"`` starts with buys below the centre only (works on a spot
account holding only quote currency); ``mode="neutral"`` also starts with sells above it (needs base
inventory on spot, or a derivatives account). If the close leaves ``[lower_bound, upper_bound]`` the grid
cancels its orders and, with ``close_on_exit``, closes its position, then stays idle.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from meltica.domain import Bar, Order, OrderStatus, OrderType, Side
from meltica.strategies.base import Strategy, StrategyContext, StrategyParams, dec, dstr
from meltica.strategies.registry import register_strategy


class GridParams(StrategyParams):
    symbol: str = Field("BTC/USDT", description="market to trade")
    quantity: Decimal = Field(Decimal("0.001"), gt=0, description="size of each level's order in base units")
    levels: int = Field(5, ge=1, le=100, description="levels on each side of the centre")
    center: Decimal | None = Field(None, gt=0, description="grid centre; None: the first close")
    step: Decimal | None = Field(None, gt=0, description="absolute distance between levels")
    step_pct: Decimal = Field(Decimal("0.25"), gt=0, lt=50, description="distance in percent of the centre")
    lower_bound: Decimal | None = Field(None, gt=0, description="stop the grid below this close")
    upper_bound: Decimal | None = Field(None, gt=0, description="stop the grid above this close")
    mode: Literal["long", "neutral"] = "long"
    close_on_exit: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> GridParams:
        if self.lower_bound is not None and self.upper_bound is not None and self.lower_bound >= self.upper_bound:
            raise ValueError("lower_bound must be below upper_bound")
        if self.mode == "long" and self.step is not None and self.center is not None and self.step >= self.center:
            # Every level of a long grid is a buy below the centre: all at or below zero, none valid.
            raise ValueError(f"step {self.step} >= center {self.center}: every buy level would be at or below zero")
        return self


@register_strategy
class Grid(Strategy[GridParams]):
    name: ClassVar[str] = "grid"
    Params: ClassVar[type[GridParams]] = GridParams

    def __init__(self, params: GridParams, ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        self.center: Decimal | None = None
        self.step: Decimal | None = None
        self.orders: dict[str, tuple[int, str]] = {}  # client order id → (level, side)
        self.halted = False

    def level_price(self, k: int) -> Decimal:
        assert self.center is not None
        assert self.step is not None
        return self.ctx.instrument(self.params.symbol).round_price(self.center + k * self.step)

    def _armed(self, k: int) -> bool:
        return any(level == k for level, _ in self.orders.values())

    def on_bar(self, bar: Bar) -> None:
        p = self.params
        if bar.symbol != p.symbol or self.halted:
            return
        if (p.lower_bound is not None and bar.close < p.lower_bound) or (
            p.upper_bound is not None and bar.close > p.upper_bound
        ):
            self._halt(bar.close)
            return
        if self.center is None:
            self._build(bar.close)

    def _build(self, close: Decimal) -> None:
        p = self.params
        self.center = p.center or close
        self.step = p.step or self.ctx.instrument(p.symbol).round_price(self.center * p.step_pct / 100)
        if self.step <= 0:
            raise ValueError("grid step rounds to zero at this price: raise step_pct")
        self.ctx.log.info("grid centre %s step %s levels %s", self.center, self.step, p.levels)
        for k in range(1, p.levels + 1):
            if self.level_price(-k) < close:
                self._arm(-k, Side.BUY)
            if p.mode == "neutral" and self.level_price(k) > close:
                self._arm(k, Side.SELL)

    def _arm(self, k: int, side: Side) -> None:
        p = self.params
        if abs(k) > p.levels or self._armed(k):
            return
        price = self.level_price(k)
        if (p.lower_bound is not None and price < p.lower_bound) or (
            p.upper_bound is not None and price > p.upper_bound
        ):
            return
        coid = self.ctx.submit(symbol=p.symbol, side=side, type=OrderType.LIMIT, quantity=p.quantity, price=price)
        self.orders[coid] = (k, side.value)

    def on_order(self, order: Order) -> None:
        entry = self.orders.get(order.client_order_id)
        if entry is None or not order.status.is_terminal:
            return
        del self.orders[order.client_order_id]
        if order.status is not OrderStatus.FILLED or self.halted:
            return
        k, side = entry
        if side == Side.BUY.value:
            self._arm(k + 1, Side.SELL)
        else:
            self._arm(k - 1, Side.BUY)

    def _halt(self, close: Decimal) -> None:
        p = self.params
        self.ctx.log.warning("close %s left the grid bounds: halting", close)
        self.halted = True
        for coid in list(self.orders):
            self.ctx.cancel(coid)
        self.orders.clear()
        qty = self.ctx.position(p.symbol).quantity
        if p.close_on_exit and qty != 0:
            side = Side.SELL if qty > 0 else Side.BUY
            self.ctx.submit(symbol=p.symbol, side=side, type=OrderType.MARKET, quantity=abs(qty))

    def on_stop(self) -> None:
        for coid in list(self.orders):
            self.ctx.cancel(coid)

    def snapshot_state(self) -> dict[str, Any]:
        return {
            **super().snapshot_state(),
            "center": dstr(self.center),
            "step": dstr(self.step),
            "orders": {coid: [k, side] for coid, (k, side) in self.orders.items()},
            "halted": self.halted,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.center = dec(state["center"])
        self.step = dec(state["step"])
        self.orders = {coid: (int(k), str(side)) for coid, (k, side) in state["orders"].items()}
        self.halted = bool(state["halted"])
