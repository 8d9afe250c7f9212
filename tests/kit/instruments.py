"""Spot instruments with the filters a test chooses (the rest derived from the symbol)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from meltica.domain.instrument import Instrument


def spot_instrument(
    symbol: str = "BTC/USDT",
    exchange: str = "paper",
    *,
    tick_size: str | Decimal = "0.01",
    step_size: str | Decimal = "0.00001",
    min_quantity: str | Decimal | None = "step",
    min_notional: str | Decimal | None = "5",
    **fields: Any,
) -> Instrument:
    """``BASE/QUOTE`` (``BASE/QUOTE:SETTLE`` too) on ``exchange``. ``min_quantity`` is the step size unless
    given; ``None`` (for it or ``min_notional``) leaves that filter out."""
    base, _, quote = symbol.partition("/")
    quote = quote.split(":")[0]
    values: dict[str, Any] = {
        "exchange": exchange,
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "tick_size": Decimal(tick_size),
        "step_size": Decimal(step_size),
        **fields,
    }
    if min_quantity is not None:
        values["min_quantity"] = Decimal(step_size if min_quantity == "step" else min_quantity)
    if min_notional is not None:
        values["min_notional"] = Decimal(min_notional)
    return Instrument(**values)
