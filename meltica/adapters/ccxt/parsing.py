"""Pure parsing: ccxt's unified structures (dicts of floats) → Meltica domain objects.

Numbers go through ``str()`` into ``Decimal`` (``to_decimal``); exchange timestamps in ms become aware
UTC datetimes here, once (DESIGN.md §4). A structure that cannot be parsed raises
``DataValidationError`` naming the venue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meltica.adapters.base import Capabilities, Ticker, VenueOrder
from meltica.adapters.ccxt.venues import VenueProfile
from meltica.domain import (
    Balance,
    Bar,
    BookLevel,
    Fill,
    LiquiditySide,
    OrderBookSnapshot,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    TopOfBook,
    Trade,
    ms_to_utc,
    to_decimal,
)
from meltica.errors import DataValidationError

Now = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    return to_decimal(value)


def ts_of(data: Mapping[str, Any], now: Now = _utc_now) -> datetime:
    ms = data.get("timestamp")
    return ms_to_utc(int(ms)) if ms is not None else now()


_TYPE_MAP: dict[str, OrderType] = {
    "market": OrderType.MARKET,
    "limit": OrderType.LIMIT,
    "limit_maker": OrderType.LIMIT,
    "stop_loss": OrderType.STOP_MARKET,
    "stop_market": OrderType.STOP_MARKET,
    "stop_loss_limit": OrderType.STOP_LIMIT,
    "stop": OrderType.STOP_LIMIT,  # Binance futures STOP is stop-limit
    "stop_limit": OrderType.STOP_LIMIT,
    "take_profit": OrderType.TAKE_PROFIT,
    "take_profit_market": OrderType.TAKE_PROFIT,
    "take_profit_limit": OrderType.TAKE_PROFIT_LIMIT,
    "trailing_stop_market": OrderType.TRAILING_STOP,
    "trailing_stop": OrderType.TRAILING_STOP,
}

_TIF_MAP: dict[str, TimeInForce] = {
    "GTC": TimeInForce.GTC,
    "IOC": TimeInForce.IOC,
    "FOK": TimeInForce.FOK,
    "GTD": TimeInForce.GTD,
    "PO": TimeInForce.GTC,
    "GTX": TimeInForce.GTC,
}


def order_type_of(order: Mapping[str, Any]) -> OrderType:
    info = order.get("info") or {}
    # ccxt folds venue types into "limit"/"market" (Binance STOP_LOSS_LIMIT → "limit"): prefer the raw one.
    venue_type = info.get("type") or info.get("o") if isinstance(info, Mapping) else None
    raw = str(venue_type or order.get("type") or "").lower()
    trailing = isinstance(info, Mapping) and info.get("trailingDelta") not in (None, "", "0", 0)
    if trailing and raw in ("stop_loss", "take_profit", "stop_loss_limit", "take_profit_limit"):
        return OrderType.TRAILING_STOP
    if raw in _TYPE_MAP:
        return _TYPE_MAP[raw]
    return OrderType.LIMIT if order.get("price") else OrderType.MARKET


def order_status_of(order: Mapping[str, Any], filled: Decimal, amount: Decimal) -> OrderStatus:
    status = str(order.get("status") or "open").lower()
    if status == "open":
        return OrderStatus.PARTIALLY_FILLED if filled > 0 else OrderStatus.OPEN
    if status == "closed":
        return OrderStatus.FILLED if amount == 0 or filled >= amount else OrderStatus.CANCELLED
    if status in ("canceled", "cancelled"):
        return OrderStatus.CANCELLED
    if status == "expired":
        return OrderStatus.EXPIRED
    if status == "rejected":
        return OrderStatus.REJECTED
    return OrderStatus.OPEN


def parse_order(exchange_id: str, order: Mapping[str, Any], now: Now = _utc_now) -> VenueOrder:
    try:
        amount = dec(order.get("amount")) or Decimal(0)
        filled = dec(order.get("filled")) or Decimal(0)
        info = order.get("info") or {}
        tif_raw = order.get("timeInForce")
        reason = None
        if isinstance(info, Mapping):
            reason = info.get("rejectReason") or info.get("r")
            if reason in ("NONE", ""):
                reason = None
        return VenueOrder(
            exchange=exchange_id,
            symbol=str(order["symbol"]),
            client_order_id=order.get("clientOrderId"),
            exchange_order_id=None if order.get("id") is None else str(order["id"]),
            status=order_status_of(order, filled, amount),
            side=Side(str(order["side"]).lower()),
            type=order_type_of(order),
            quantity=amount,
            filled_quantity=filled,
            price=dec(order.get("price")) or None,
            trigger_price=dec(order.get("triggerPrice") or order.get("stopPrice")) or None,
            average_fill_price=dec(order.get("average")) or None,
            time_in_force=_TIF_MAP.get(str(tif_raw).upper()) if tif_raw else None,
            ts=ts_of(order, now) if order.get("timestamp") is not None else None,
            reason=None if reason is None else str(reason),
            raw=dict(info) if isinstance(info, Mapping) else {},
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DataValidationError(f"cannot parse {exchange_id} order: {exc}", source=f"ccxt:{exchange_id}") from exc


def parse_trade(exchange_id: str, trade: Mapping[str, Any], now: Now = _utc_now) -> Trade:
    try:
        side = trade.get("side")
        return Trade(
            exchange=exchange_id,
            symbol=str(trade["symbol"]),
            trade_id=str(trade["id"]),
            price=to_decimal(trade["price"]),
            quantity=to_decimal(trade["amount"]),
            aggressor_side=Side(side) if side in ("buy", "sell") else None,
            ts=ts_of(trade, now),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DataValidationError(f"cannot parse {exchange_id} trade: {exc}", source=f"ccxt:{exchange_id}") from exc


def client_id_of_trade(trade: Mapping[str, Any]) -> str | None:
    """Our client order id on a private trade, when the venue sends it (Binance executionReport ``c``)."""
    value = trade.get("clientOrderId")
    info = trade.get("info") or {}
    if not value and isinstance(info, Mapping):
        value = info.get("clientOrderId") or info.get("c")
    return str(value) if value else None


def parse_fill(exchange_id: str, trade: Mapping[str, Any], client_order_id: str, now: Now = _utc_now) -> Fill:
    try:
        fee = trade.get("fee") or {}
        taker_or_maker = trade.get("takerOrMaker")
        return Fill(
            fill_id=str(trade["id"]),
            client_order_id=client_order_id,
            exchange_order_id=None if trade.get("order") is None else str(trade["order"]),
            exchange=exchange_id,
            symbol=str(trade["symbol"]),
            side=Side(str(trade["side"]).lower()),
            price=to_decimal(trade["price"]),
            quantity=to_decimal(trade["amount"]),
            fee=dec(fee.get("cost")) or Decimal(0),
            fee_currency=fee.get("currency"),
            liquidity=LiquiditySide(taker_or_maker) if taker_or_maker in ("maker", "taker") else None,
            ts=ts_of(trade, now),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DataValidationError(f"cannot parse {exchange_id} fill: {exc}", source=f"ccxt:{exchange_id}") from exc


def parse_ohlcv(exchange_id: str, symbol: str, timeframe: str, row: list[Any]) -> Bar:
    try:
        ts, o, h, low, c, v = row[:6]
        return Bar(
            exchange=exchange_id,
            symbol=symbol,
            timeframe=timeframe,
            ts=ms_to_utc(int(ts)),
            open=to_decimal(o),
            high=to_decimal(h),
            low=to_decimal(low),
            close=to_decimal(c),
            volume=to_decimal(v or 0),
        )
    except (ValueError, TypeError) as exc:
        raise DataValidationError(f"cannot parse {exchange_id} candle: {exc}", source=f"ccxt:{exchange_id}") from exc


def parse_ticker(exchange_id: str, ticker: Mapping[str, Any], now: Now = _utc_now) -> Ticker:
    return Ticker(
        exchange=exchange_id,
        symbol=str(ticker.get("symbol")),
        ts=ts_of(ticker, now),
        bid=dec(ticker.get("bid")),
        ask=dec(ticker.get("ask")),
        last=dec(ticker.get("last")),
        base_volume=dec(ticker.get("baseVolume")),
        quote_volume=dec(ticker.get("quoteVolume")),
    )


def parse_top_of_book(exchange_id: str, ticker: Mapping[str, Any], now: Now = _utc_now) -> TopOfBook:
    """A ccxt ticker (``watch_bids_asks``/``watch_ticker``/``fetch_ticker``) as best bid and ask."""
    return TopOfBook(
        exchange=exchange_id,
        symbol=str(ticker.get("symbol")),
        bid=dec(ticker.get("bid")) or None,
        bid_quantity=dec(ticker.get("bidVolume")),
        ask=dec(ticker.get("ask")) or None,
        ask_quantity=dec(ticker.get("askVolume")),
        ts=ts_of(ticker, now),
    )


def parse_balances(balance: Mapping[str, Any], *, keep_zero: bool = False) -> dict[str, Balance]:
    free = balance.get("free") or {}
    used = balance.get("used") or {}
    out: dict[str, Balance] = {}
    for asset in set(free) | set(used):
        f = dec(free.get(asset)) or Decimal(0)
        u = dec(used.get(asset)) or Decimal(0)
        if not keep_zero and f == 0 and u == 0:
            continue
        out[asset] = Balance(asset=asset, free=max(f, Decimal(0)), locked=max(u, Decimal(0)))
    return out


def parse_order_book(
    exchange_id: str, book: Mapping[str, Any], depth: int | None = None, now: Now = _utc_now
) -> OrderBookSnapshot:
    bids = book.get("bids") or []
    asks = book.get("asks") or []
    if depth is not None:
        bids, asks = bids[:depth], asks[:depth]
    return OrderBookSnapshot(
        exchange=exchange_id,
        symbol=str(book.get("symbol")),
        bids=tuple(BookLevel(price=to_decimal(p), quantity=to_decimal(q)) for p, q, *_ in bids if q),
        asks=tuple(BookLevel(price=to_decimal(p), quantity=to_decimal(q)) for p, q, *_ in asks if q),
        sequence=book.get("nonce"),
        ts=ts_of(book, now),
    )


def capabilities_from(has: Mapping[str, Any], profile: VenueProfile) -> Capabilities:
    """The capability matrix from ccxt's ``exchange.has`` plus the venue profile."""

    def yes(key: str) -> bool:
        return bool(has.get(key))

    types = {OrderType.MARKET, OrderType.LIMIT} if yes("createOrder") else set()
    if yes("createStopOrder") or yes("createTriggerOrder") or yes("createStopLimitOrder"):
        types |= {OrderType.STOP_LIMIT, OrderType.STOP_MARKET}
    if yes("createTakeProfitOrder"):
        types |= {OrderType.TAKE_PROFIT, OrderType.TAKE_PROFIT_LIMIT}
    trailing = profile.trailing is not None and (yes("createTrailingPercentOrder") or yes("createTrailingAmountOrder"))
    if trailing:
        types.add(OrderType.TRAILING_STOP)
    tifs = {TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK} if types else set()
    if profile.gtd_param is not None:
        tifs.add(TimeInForce.GTD)
    return Capabilities(
        order_types=frozenset(types),
        time_in_force=frozenset(tifs),
        post_only=yes("createPostOnlyOrder"),
        reduce_only=yes("createReduceOnlyOrder"),
        iceberg=profile.iceberg_param is not None,
        trailing_stop=trailing,
        oco=yes("createOrderWithTakeProfitAndStopLoss"),
        amend=yes("editOrder"),
        cancel_replace=yes("editOrder") and profile.name == "binance",  # spot editOrder = cancelReplace
        cancel_all=yes("cancelAllOrders"),
        fetch_order_by_client_id=profile.client_id_query_param is not None and yes("fetchOrder"),
        watch_order_book=yes("watchOrderBook"),
        watch_trades=yes("watchTrades"),
        watch_ohlcv=yes("watchOHLCV"),
        watch_orders=yes("watchOrders"),
        watch_my_trades=yes("watchMyTrades"),
        watch_balance=yes("watchBalance"),
    )
