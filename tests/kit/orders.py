"""Order intents many tests build the same way."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from meltica.domain import OrderIntent, OrderType, Side


def trailing_stop_intent(
    intent_id: str,
    *,
    created_at: datetime,
    strategy: str = "s",
    symbol: str = "BTC/USDT",
    quantity: str = "0.1",
    offset: str = "100",
) -> OrderIntent:
    """A sell trailing stop of ``alice`` on ``paper`` with an absolute offset. Venues trail in bps only,
    so the OMS always holds such an order in its local emulation."""
    return OrderIntent(
        intent_id=intent_id,
        account="alice",
        strategy=strategy,
        exchange="paper",
        symbol=symbol,
        side=Side.SELL,
        type=OrderType.TRAILING_STOP,
        quantity=Decimal(quantity),
        trailing_offset=Decimal(offset),
        created_at=created_at,
    )
