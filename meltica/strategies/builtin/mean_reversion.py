"""``mean_reversion``: z-score (Bollinger band) entries, exits at the mean, on a stop, or after a time limit.

The z-score of the close against the rolling mean and standard deviation of the last ``period`` closes
(the Bollinger band with ``k = entry_z``): below ``-entry_z`` it buys (the price is stretched down),
above ``+entry_z`` it sells short when ``allow_short``. A position is closed with a market order when the
z-score comes back to ``exit_z`` on the mean's side, when it has been held ``max_holding_bars`` bars, or by
its stop-market order ``stop_pct`` percent away from the entry, whichever comes first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import Field, model_validator

from meltica.domain import Bar, Order, OrderType, Side
from meltica.strategies.base import Strategy, StrategyContext, StrategyParams
from meltica.strategies.indicators import RollingStats
from meltica.strategies.registry import register_strategy


class MeanReversionParams(StrategyParams):
    symbol: str = Field("BTC/USDT", description="market to trade")
    quantity: Decimal = Field(Decimal("0.01"), gt=0, description="position size in base units")
    period: int = Field(20, ge=5, le=5000, description="lookback of the mean and standard deviation (bars)")
    entry_z: float = Field(2.0, gt=0, le=10, description="enter when |z| reaches this")
    exit_z: float = Field(0.0, ge=-5, le=10, description="exit when z is back to this, on the mean's side")
    stop_pct: Decimal = Field(Decimal("1.5"), gt=0, lt=50, description="stop distance from entry, percent")
    max_holding_bars: int = Field(60, ge=1, description="close a position held this many bars")
    allow_short: bool = Field(False, description="sell stretched-up prices short")

    @model_validator(mode="after")
    def _exit_inside_entry(self) -> MeanReversionParams:
        if self.exit_z >= self.entry_z:
            raise ValueError(f"exit_z ({self.exit_z}) must be below entry_z ({self.entry_z})")
        return self


@register_strategy
class MeanReversion(Strategy[MeanReversionParams]):
    name: ClassVar[str] = "mean_reversion"
    Params: ClassVar[type[MeanReversionParams]] = MeanReversionParams

    def __init__(self, params: MeanReversionParams, ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        self.stats = RollingStats(params.period, ddof=1)
        self.working_coid: str | None = None  # the entry or exit market order in flight
        self.stop_coid: str | None = None
        self.bars_held = 0
        self.last_close = math.nan

    def on_bar(self, bar: Bar) -> None:
        p = self.params
        if bar.symbol != p.symbol:
            return
        close = float(bar.close)
        self.last_close = close
        self.stats.update(close)
        if not self.stats.ready or self.working_coid is not None:
            return
        z = self.stats.zscore(close)
        qty = self.ctx.position(p.symbol).quantity
        if qty == 0:
            if z <= -p.entry_z:
                self._market(Side.BUY, p.quantity, f"enter long z={z:.2f}")
            elif z >= p.entry_z and p.allow_short:
                self._market(Side.SELL, p.quantity, f"enter short z={z:.2f}")
            return
        self.bars_held += 1
        back = z >= -p.exit_z if qty > 0 else z <= p.exit_z
        if back or self.bars_held >= p.max_holding_bars:
            self._cancel_stop()
            why = "mean" if back else "time"
            self._market(Side.SELL if qty > 0 else Side.BUY, abs(qty), f"exit ({why}) z={z:.2f}")

    def _market(self, side: Side, quantity: Decimal, why: str) -> None:
        self.ctx.log.info("%s: %s %s", why, side.value, quantity)
        self.working_coid = self.ctx.submit(
            symbol=self.params.symbol, side=side, type=OrderType.MARKET, quantity=quantity
        )

    def _cancel_stop(self) -> None:
        if self.stop_coid is not None:
            self.ctx.cancel(self.stop_coid)
            self.stop_coid = None

    def on_order(self, order: Order) -> None:
        if not order.status.is_terminal:
            return
        coid = order.client_order_id
        if coid == self.stop_coid:
            self.stop_coid = None
            self.bars_held = 0
        elif coid == self.working_coid:
            self.working_coid = None
            self.bars_held = 0
            self._protect(order)

    def _protect(self, order: Order) -> None:
        p = self.params
        qty = self.ctx.position(p.symbol).quantity
        self._cancel_stop()
        if qty == 0:
            return
        entry = float(order.avg_fill_price) if order.avg_fill_price is not None else self.last_close
        ref = self.last_close if not math.isnan(self.last_close) else entry
        # Beyond both the entry and the current price: a stop must not trigger the moment it arrives.
        distance = entry * float(p.stop_pct) / 100
        trigger = min(entry - distance, ref * 0.9995) if qty > 0 else max(entry + distance, ref * 1.0005)
        self.stop_coid = self.ctx.submit(
            symbol=p.symbol,
            side=Side.SELL if qty > 0 else Side.BUY,
            type=OrderType.STOP_MARKET,
            quantity=abs(qty),
            trigger_price=Decimal(repr(trigger)),
        )

    def snapshot_state(self) -> dict[str, Any]:
        return {
            **super().snapshot_state(),
            "stats": self.stats.state(),
            "working_coid": self.working_coid,
            "stop_coid": self.stop_coid,
            "bars_held": self.bars_held,
            "last_close": None if math.isnan(self.last_close) else self.last_close,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.stats = RollingStats.from_state(state["stats"])
        self.working_coid = state["working_coid"]
        self.stop_coid = state["stop_coid"]
        self.bars_held = int(state["bars_held"])
        self.last_close = math.nan if state["last_close"] is None else float(state["last_close"])
