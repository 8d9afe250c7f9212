"""``momentum``: EMA fast/slow crossover trend following with a protective stop order.

On a bar where the fast EMA crosses the slow EMA the strategy moves to its target position (long
``quantity`` on an up-cross; short ``quantity`` on a down-cross when ``allow_short``, else flat) with a
market order. Once an entry fills it places a stop on the whole position: a stop-market order at a
percentage or ATR-multiple distance, or a trailing stop (``stop="none"``: no stop, the crossover rule alone —
what the vectorised sweep path models exactly). The OMS sends it natively where the venue
supports it and emulates it otherwise; the strategy does not care which. After a stop-out it waits for the
next crossover.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from meltica.domain import Bar, Fill, Order, OrderType, Side
from meltica.strategies.base import Strategy, StrategyContext, StrategyParams
from meltica.strategies.indicators import ATR, EMA
from meltica.strategies.registry import register_strategy

MIN_STOP_FRACTION = 0.0005  # never closer than 5 bps: the venue refuses a stop that would trigger at once


class MomentumParams(StrategyParams):
    symbol: str = Field("BTC/USDT", description="market to trade")
    quantity: Decimal = Field(Decimal("0.01"), gt=0, description="position size in base units")
    fast: int = Field(12, ge=2, le=1000, description="fast EMA period (bars)")
    slow: int = Field(26, ge=3, le=5000, description="slow EMA period (bars)")
    allow_short: bool = Field(False, description="go short on a down-cross (else go flat)")
    stop: Literal["atr", "percent", "trailing", "none"] = Field(
        "atr", description="stop distance model; none: no protective stop (the crossover rule alone)"
    )
    stop_pct: Decimal = Field(Decimal("2"), gt=0, lt=50, description="percent stop / trailing offset")
    atr_period: int = Field(14, ge=2, le=1000)
    atr_multiple: float = Field(3.0, gt=0, le=50)

    @model_validator(mode="after")
    def _fast_below_slow(self) -> MomentumParams:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be below slow ({self.slow})")
        return self


@register_strategy
class Momentum(Strategy[MomentumParams]):
    name: ClassVar[str] = "momentum"
    Params: ClassVar[type[MomentumParams]] = MomentumParams

    def __init__(self, params: MomentumParams, ctx: StrategyContext) -> None:
        super().__init__(params, ctx)
        self.fast = EMA(params.fast)
        self.slow = EMA(params.slow)
        self.atr = ATR(params.atr_period)
        self.signal = 0  # +1 fast above slow, -1 below, 0 unknown
        self.stop_coid: str | None = None
        self.entry_coid: str | None = None
        self.last_close = math.nan

    def on_bar(self, bar: Bar) -> None:
        p = self.params
        if bar.symbol != p.symbol:
            return
        close = float(bar.close)
        self.last_close = close
        fast = self.fast.update(close)
        slow = self.slow.update(close)
        self.atr.update(float(bar.high), float(bar.low), close)
        if not self.slow.ready:
            return
        signal = 1 if fast > slow else -1 if fast < slow else self.signal
        crossed = self.signal != 0 and signal != self.signal
        self.signal = signal
        if not crossed or self.entry_coid is not None:
            return
        target = p.quantity if signal > 0 else (-p.quantity if p.allow_short else Decimal(0))
        delta = target - self.ctx.position(p.symbol).quantity
        if delta == 0:
            return
        self._cancel_stop()
        side = Side.BUY if delta > 0 else Side.SELL
        self.ctx.log.info("cross %s: %s %s", "up" if signal > 0 else "down", side.value, abs(delta))
        self.entry_coid = self.ctx.submit(symbol=p.symbol, side=side, type=OrderType.MARKET, quantity=abs(delta))

    def on_order(self, order: Order) -> None:
        if not order.status.is_terminal:
            return
        if order.client_order_id == self.stop_coid:
            self.stop_coid = None
        elif order.client_order_id == self.entry_coid:
            self.entry_coid = None
            self._protect()

    def on_fill(self, fill: Fill) -> None:
        pass  # the position is settled when the entry order is done (on_order)

    def _cancel_stop(self) -> None:
        if self.stop_coid is not None:
            self.ctx.cancel(self.stop_coid)
            self.stop_coid = None

    def _protect(self) -> None:
        """A stop for the whole current position (replacing any older one)."""
        p = self.params
        self._cancel_stop()
        qty = self.ctx.position(p.symbol).quantity
        if p.stop == "none" or qty == 0 or math.isnan(self.last_close):
            return
        side = Side.SELL if qty > 0 else Side.BUY
        if p.stop == "trailing":
            self.stop_coid = self.ctx.submit(
                symbol=p.symbol,
                side=side,
                type=OrderType.TRAILING_STOP,
                quantity=abs(qty),
                trailing_offset_pct=p.stop_pct,
            )
            return
        ref = self.last_close
        distance = ref * float(p.stop_pct) / 100 if p.stop == "percent" else self.atr.value * p.atr_multiple
        distance = max(distance, ref * MIN_STOP_FRACTION)
        trigger = ref - distance if qty > 0 else ref + distance
        self.stop_coid = self.ctx.submit(
            symbol=p.symbol,
            side=side,
            type=OrderType.STOP_MARKET,
            quantity=abs(qty),
            trigger_price=Decimal(repr(trigger)),
        )

    def snapshot_state(self) -> dict[str, Any]:
        return {
            **super().snapshot_state(),
            "fast": self.fast.state(),
            "slow": self.slow.state(),
            "atr": self.atr.state(),
            "signal": self.signal,
            "stop_coid": self.stop_coid,
            "entry_coid": self.entry_coid,
            "last_close": None if math.isnan(self.last_close) else self.last_close,
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.fast = EMA.from_state(state["fast"])
        self.slow = EMA.from_state(state["slow"])
        self.atr = ATR.from_state(state["atr"])
        self.signal = int(state["signal"])
        self.stop_coid = state["stop_coid"]
        self.entry_coid = state["entry_coid"]
        self.last_close = math.nan if state["last_close"] is None else float(state["last_close"])
