"""Pure translation of a domain ``OrderIntent`` into ccxt ``create_order`` arguments.

No I/O: the adapter calls ``build_order_request`` and hands the result to ccxt. Prices and
quantities are rounded with the ``Instrument`` (passive price rounding for limit prices, nearest for
triggers, quantity floored) before anything leaves the process (DESIGN.md §4). What the venue cannot
do natively is refused here with ``InvalidOrderError`` (reason ``unsupported_by_venue``); the
execution engine emulates those locally using the capability matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meltica.adapters.base import Capabilities
from meltica.adapters.ccxt.venues import VenueProfile
from meltica.domain import (
    CLIENT_ORDER_ID_PATTERN,
    Instrument,
    MarketType,
    OrderIntent,
    OrderType,
    PriceRounding,
    TimeInForce,
    utc_to_ms,
)
from meltica.errors import InvalidOrderError


@dataclass(frozen=True)
class OrderRequest:
    """Arguments of ``exchange.create_order(symbol, type, side, amount, price, params)``."""

    symbol: str
    type: str  # ccxt unified: "market" | "limit"
    side: str  # "buy" | "sell"
    amount: Decimal
    price: Decimal | None
    params: dict[str, Any] = field(default_factory=dict)

    def ccxt_args(self) -> tuple[str, str, str, float, float | None, dict[str, Any]]:
        """Positional arguments for ccxt (numbers as floats of the already-rounded decimals)."""
        return (
            self.symbol,
            self.type,
            self.side,
            float(self.amount),
            None if self.price is None else float(self.price),
            dict(self.params),
        )


def _unsupported(intent: OrderIntent, what: str, venue: str) -> InvalidOrderError:
    return InvalidOrderError(
        f"{venue} {intent.symbol}: {what} is not supported natively",
        reason="unsupported_by_venue",
        intent_id=intent.intent_id,
    )


def format_decimal(value: Decimal) -> str:
    """Plain notation, no exponent (``1E+1`` → ``10``), as venues expect numeric strings."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def build_order_request(
    intent: OrderIntent,
    instrument: Instrument,
    client_order_id: str,
    profile: VenueProfile,
    capabilities: Capabilities | None = None,
) -> OrderRequest:
    """The ccxt request for ``intent``; raises ``InvalidOrderError`` when the venue cannot take it."""
    venue = instrument.exchange
    if capabilities is not None and not capabilities.supports(intent.type):
        raise _unsupported(intent, f"order type {intent.type.value}", venue)
    if not CLIENT_ORDER_ID_PATTERN.match(client_order_id) or len(client_order_id) > profile.client_id_max_len:
        raise InvalidOrderError(f"client order id {client_order_id!r} is not valid for {venue}", reason="bad_client_id")

    amount = instrument.round_quantity(intent.quantity)
    price = None if intent.price is None else instrument.round_price(intent.price, intent.side)
    instrument.validate_order(price, amount)
    params: dict[str, Any] = {profile.client_id_param: client_order_id}
    trigger = (
        None
        if intent.trigger_price is None
        else instrument.round_price(intent.trigger_price, mode=PriceRounding.NEAREST)
    )
    kind = intent.type
    ccxt_type = "limit" if kind.needs_price else "market"

    if kind in (OrderType.STOP_MARKET, OrderType.STOP_LIMIT):
        assert trigger is not None  # the intent validator guarantees it
        params["stopLossPrice"] = float(trigger)
    elif kind in (OrderType.TAKE_PROFIT, OrderType.TAKE_PROFIT_LIMIT):
        assert trigger is not None
        params["takeProfitPrice"] = float(trigger)
    elif kind is OrderType.TRAILING_STOP:
        _trailing_params(intent, instrument, profile, params)

    # Time in force: only limit-priced orders carry one; post-only is its own flag.
    if kind.needs_price:
        if intent.post_only:
            if capabilities is not None and not capabilities.post_only:
                raise _unsupported(intent, "post_only", venue)
            params["postOnly"] = True
        elif intent.time_in_force is TimeInForce.GTD:
            if profile.gtd_param is None or instrument.market_type is MarketType.SPOT:
                raise _unsupported(intent, "time_in_force GTD", venue)
            assert intent.expire_at is not None
            params["timeInForce"] = "GTD"
            params[profile.gtd_param] = utc_to_ms(intent.expire_at)
        else:
            params["timeInForce"] = intent.time_in_force.value
    elif intent.time_in_force in (TimeInForce.GTD,):
        raise _unsupported(intent, f"time_in_force GTD on a {kind.value} order", venue)

    if intent.display_quantity is not None:
        if profile.iceberg_param is None or (capabilities is not None and not capabilities.iceberg):
            raise _unsupported(intent, "iceberg (display_quantity)", venue)
        shown = instrument.round_quantity(intent.display_quantity)
        if shown <= 0:
            raise InvalidOrderError(
                f"{venue} {intent.symbol}: display_quantity rounds to 0 at step {instrument.step_size}",
                reason="violates_step_size",
            )
        params[profile.iceberg_param] = format_decimal(shown)

    if intent.reduce_only:
        if instrument.market_type is MarketType.SPOT:
            raise _unsupported(intent, "reduce_only on a spot market", venue)
        params["reduceOnly"] = True

    return OrderRequest(
        symbol=instrument.symbol,
        type=ccxt_type,
        side=intent.side.value,
        amount=amount,
        price=price,
        params=params,
    )


def _trailing_params(
    intent: OrderIntent, instrument: Instrument, profile: VenueProfile, params: dict[str, Any]
) -> None:
    venue = instrument.exchange
    if profile.trailing is None:
        raise _unsupported(intent, "trailing_stop", venue)
    if intent.trailing_offset_pct is not None:
        if profile.trailing != "percent":
            raise _unsupported(intent, "a percentage trailing offset", venue)
        params["trailingPercent"] = float(intent.trailing_offset_pct)
    else:
        if profile.trailing != "amount":
            raise _unsupported(intent, "an absolute trailing offset (venue trails by percent)", venue)
        assert intent.trailing_offset is not None
        params["trailingAmount"] = float(instrument.round_price(intent.trailing_offset, mode=PriceRounding.NEAREST))
    if profile.trailing_needs_sl_tp and instrument.market_type is MarketType.SPOT:
        # A trailing *stop* (Binance STOP_LOSS with trailingDelta) — triggers against the position.
        params["stopLossOrTakeProfit"] = "stopLoss"
    if intent.activation_price is not None:
        activation = instrument.round_price(intent.activation_price, mode=PriceRounding.NEAREST)
        params["trailingTriggerPrice"] = float(activation)
