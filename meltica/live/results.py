"""What a paper run produced, rebuilt from the pipeline's own output (``orders.events``).

``PaperRunCollector`` reads the execution agent's ``OrderUpdate``s and ``VenueProgress`` markers for
one account and builds the same :class:`~meltica.backtest.results.BacktestResult` a backtest builds —
orders (latest state per client order id), fills (from ``OrderFilled`` events, deduplicated by fill id)
and one equity point per bar, marked to the bar's close exactly as the backtest engine marks it
(``cash + base holdings × close``, balances replayed from the fills) — so ``meltica paper`` writes the
files ``meltica backtest --output`` writes and the two can be compared line by line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from meltica.backtest.results import BacktestResult, EquityPoint
from meltica.domain import Fill, Order, OrderFilled, Side
from meltica.messaging.schemas import OrderUpdate, VenueProgress

_ZERO = Decimal(0)


@dataclass
class PaperRunCollector:
    """Fold ``orders.events`` of one account/symbol into a backtest-shaped result."""

    account: str
    exchange: str
    symbol: str
    base: str
    quote: str
    initial_balances: Mapping[str, Decimal]
    orders: dict[str, Order] = field(default_factory=dict)
    fills: list[Fill] = field(default_factory=list)
    equity: list[EquityPoint] = field(default_factory=list)
    bars: int = 0
    ended: bool = False
    last_close: Decimal | None = None
    first_bar: datetime | None = None
    last_bar_end: datetime | None = None
    _fill_ids: set[str] = field(default_factory=set)
    _balances: dict[str, Decimal] = field(default_factory=dict)
    _seen_steps: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._balances = {asset: Decimal(amount) for asset, amount in self.initial_balances.items()}

    # --- input ---------------------------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        """Apply one decoded ``orders.events`` message (other accounts and symbols are ignored)."""
        if getattr(message, "account", None) != self.account:
            return
        if isinstance(message, OrderUpdate):
            self._on_update(message)
        elif isinstance(message, VenueProgress):
            self._on_progress(message)

    def _on_update(self, update: OrderUpdate) -> None:
        order = update.order
        if order.intent.symbol != self.symbol:
            return
        current = self.orders.get(order.client_order_id)
        if current is None or order.updated_at >= current.updated_at:
            self.orders[order.client_order_id] = order
        event = update.event
        leg = f"{event.fill.fill_id}|{event.fill.side.value}" if isinstance(event, OrderFilled) else ""
        if isinstance(event, OrderFilled) and leg not in self._fill_ids:
            self._fill_ids.add(leg)
            self.fills.append(event.fill)
            self._apply_fill(event.fill)

    def _apply_fill(self, fill: Fill) -> None:
        sign = Decimal(1) if fill.side is Side.BUY else Decimal(-1)
        self._balances[self.base] = self._balances.get(self.base, _ZERO) + sign * fill.quantity
        self._balances[self.quote] = self._balances.get(self.quote, _ZERO) - sign * fill.price * fill.quantity
        if fill.fee and fill.fee_currency:
            self._balances[fill.fee_currency] = self._balances.get(fill.fee_currency, _ZERO) - fill.fee

    def _on_progress(self, progress: VenueProgress) -> None:
        if progress.symbol != self.symbol or progress.exchange != self.exchange:
            return
        if progress.phase == "end":
            self.ended = True
            return
        if progress.phase != "close" or progress.bar is None or progress.seq in self._seen_steps:
            return
        self._seen_steps.add(progress.seq)
        bar = progress.bar
        self.bars += 1
        self.first_bar = self.first_bar or bar.ts
        self.last_bar_end = progress.ts
        self.last_close = bar.close
        cash, held = self.cash(), self.held()
        value = held * bar.close if held else _ZERO
        point = EquityPoint(ts=progress.ts, equity=cash + value, cash=cash, position_value=value)
        if self.equity and self.equity[-1].ts == point.ts:
            self.equity[-1] = point
        else:
            self.equity.append(point)

    # --- reads ---------------------------------------------------------------------------------
    def cash(self) -> Decimal:
        return self._balances.get(self.quote, _ZERO)

    def held(self) -> Decimal:
        return self._balances.get(self.base, _ZERO)

    def equity_now(self) -> Decimal | None:
        return self.equity[-1].equity if self.equity else None

    def result(
        self,
        *,
        strategy: str,
        params: Mapping[str, Any],
        timeframe: str,
        fill_model: Mapping[str, Any] | None = None,
    ) -> BacktestResult:
        fill_info = dict(fill_model or {})
        fill_info["run"] = "paper (live pipeline, lock-step replay)"
        return BacktestResult.from_run(
            strategy=strategy,
            symbols=[self.symbol],
            equity=self.equity,
            fills=self.fills,
            orders=list(self.orders.values()),
            params=dict(params),
            exchange=self.exchange,
            timeframe=timeframe,
            data_start=self.first_bar,
            data_end=self.last_bar_end,
            fill_model=fill_info,
        )
