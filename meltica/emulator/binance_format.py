"""Pure functions: matching-engine snapshots → Binance spot JSON (REST answers, user-data events).

Shapes follow the official samples in ``binance-docs/samples``; conditional fields (``stopPrice``,
``icebergQty``, ``trailingDelta``, ``trailingTime``) appear only when they apply, as Binance does.
Numbers are strings with 8 decimals (as Binance writes them), times epoch milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from meltica.domain.values import utc_to_ms
from meltica.matching import BalanceUpdate, EngineFill, EngineOrder, ExecutionReport, LedgerBalance


def f8(value: Decimal) -> str:
    return f"{value:.8f}"


def ms(value: datetime | None) -> int:
    return -1 if value is None else utc_to_ms(value)


def side(order_side: object) -> str:
    return str(order_side).upper()


def _conditional(order: EngineOrder, out: dict[str, Any]) -> None:
    if order.type.is_conditional or order.stop_price > 0:
        out["stopPrice"] = f8(order.stop_price)
    if order.iceberg_quantity > 0:
        out["icebergQty"] = f8(order.iceberg_quantity)
    if order.trailing_delta_bps is not None:
        out["trailingDelta"] = order.trailing_delta_bps
        if order.trailing_time is not None:
            out["trailingTime"] = ms(order.trailing_time)


def order_ack(order: EngineOrder) -> dict[str, Any]:
    return {
        "symbol": order.symbol,
        "orderId": order.order_id,
        "orderListId": -1,
        "clientOrderId": order.client_order_id,
        "transactTime": ms(order.time),
    }


def order_result(order: EngineOrder, transact: datetime | None = None) -> dict[str, Any]:
    out = order_ack(order)
    if transact is not None:
        out["transactTime"] = ms(transact)
    out.update(
        {
            "price": f8(order.price),
            "origQty": f8(order.quantity),
            "executedQty": f8(order.executed_quantity),
            "origQuoteOrderQty": f8(order.quote_quantity),
            "cummulativeQuoteQty": f8(order.cumulative_quote_quantity),
            "status": order.status.value,
            "timeInForce": order.time_in_force.value,
            "type": order.type.value,
            "side": side(order.side),
            "workingTime": ms(order.working_time),
        }
    )
    _conditional(order, out)
    out["selfTradePreventionMode"] = order.self_trade_prevention.value
    return out


def order_full(order: EngineOrder, fills: Iterable[EngineFill]) -> dict[str, Any]:
    out = order_result(order)
    out["fills"] = [
        {
            "price": f8(f.price),
            "qty": f8(f.quantity),
            "commission": f8(f.commission),
            "commissionAsset": f.commission_asset,
            "tradeId": f.trade_id,
        }
        for f in fills
        if f.order_id == order.order_id
    ]
    return out


def order_response(order: EngineOrder, fills: Iterable[EngineFill], resp_type: str) -> dict[str, Any]:
    if resp_type == "ACK":
        return order_ack(order)
    if resp_type == "RESULT":
        return order_result(order)
    return order_full(order, fills)


def default_resp_type(order_type: str) -> str:
    """Binance: MARKET and LIMIT default to FULL, every other type to ACK."""
    return "FULL" if order_type in ("MARKET", "LIMIT") else "ACK"


def order_query(order: EngineOrder) -> dict[str, Any]:
    """``GET /api/v3/order``, ``openOrders``, ``allOrders`` entries."""
    out: dict[str, Any] = {
        "symbol": order.symbol,
        "orderId": order.order_id,
        "orderListId": -1,
        "clientOrderId": order.client_order_id,
        "price": f8(order.price),
        "origQty": f8(order.quantity),
        "executedQty": f8(order.executed_quantity),
        "cummulativeQuoteQty": f8(order.cumulative_quote_quantity),
        "status": order.status.value,
        "timeInForce": order.time_in_force.value,
        "type": order.type.value,
        "side": side(order.side),
        "stopPrice": f8(order.stop_price),
        "icebergQty": f8(order.iceberg_quantity),
        "time": ms(order.time),
        "updateTime": ms(order.update_time),
        "isWorking": order.working,
        "workingTime": ms(order.working_time),
        "origQuoteOrderQty": f8(order.quote_quantity),
        "selfTradePreventionMode": order.self_trade_prevention.value,
    }
    if order.trailing_delta_bps is not None:
        out["trailingDelta"] = order.trailing_delta_bps
        if order.trailing_time is not None:
            out["trailingTime"] = ms(order.trailing_time)
    return out


def cancel_response(order: EngineOrder, cancel_client_id: str, transact: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "symbol": order.symbol,
        "origClientOrderId": order.client_order_id,
        "orderId": order.order_id,
        "orderListId": -1,
        "clientOrderId": cancel_client_id,
        "transactTime": ms(transact),
        "price": f8(order.price),
        "origQty": f8(order.quantity),
        "executedQty": f8(order.executed_quantity),
        "origQuoteOrderQty": f8(order.quote_quantity),
        "cummulativeQuoteQty": f8(order.cumulative_quote_quantity),
        "status": order.status.value,
        "timeInForce": order.time_in_force.value,
        "type": order.type.value,
        "side": side(order.side),
    }
    _conditional(order, out)
    out["selfTradePreventionMode"] = order.self_trade_prevention.value
    return out


def my_trade(fill: EngineFill) -> dict[str, Any]:
    return {
        "symbol": fill.symbol,
        "id": fill.trade_id,
        "orderId": fill.order_id,
        "orderListId": -1,
        "price": f8(fill.price),
        "qty": f8(fill.quantity),
        "quoteQty": f8(fill.quote_quantity),
        "commission": f8(fill.commission),
        "commissionAsset": fill.commission_asset,
        "time": ms(fill.time),
        "isBuyer": side(fill.side) == "BUY",
        "isMaker": fill.is_maker,
        "isBestMatch": True,
    }


def rate_to_bps_int(rate: Decimal) -> int:
    """Binance's legacy integer commission: 0.001 → 10."""
    return int(rate * 10_000)


def account(
    balances: dict[str, LedgerBalance], maker: Decimal, taker: Decimal, update_ms: int, uid: int
) -> dict[str, Any]:
    return {
        "makerCommission": rate_to_bps_int(maker),
        "takerCommission": rate_to_bps_int(taker),
        "buyerCommission": 0,
        "sellerCommission": 0,
        "commissionRates": {"maker": f8(maker), "taker": f8(taker), "buyer": f8(Decimal(0)), "seller": f8(Decimal(0))},
        "canTrade": True,
        "canWithdraw": True,
        "canDeposit": True,
        "brokered": False,
        "requireSelfTradePrevention": False,
        "preventSor": False,
        "updateTime": update_ms,
        "accountType": "SPOT",
        "balances": [
            {"asset": asset, "free": f8(bal.free), "locked": f8(bal.locked)} for asset, bal in sorted(balances.items())
        ],
        "permissions": ["SPOT"],
        "uid": uid,
    }


# --- user data stream events ---------------------------------------------------------------------


def execution_report(
    update: ExecutionReport, event_ms: int, execution_id: int, cancel_client_id: str | None = None
) -> dict[str, Any]:
    order = update.order
    fill = update.fill
    client_id = order.client_order_id
    orig_client_id = ""
    if update.execution.value == "CANCELED" and cancel_client_id is not None:
        client_id, orig_client_id = cancel_client_id, order.client_order_id
    out: dict[str, Any] = {
        "e": "executionReport",
        "E": event_ms,
        "s": order.symbol,
        "c": client_id,
        "S": side(order.side),
        "o": order.type.value,
        "f": order.time_in_force.value,
        "q": f8(order.quantity),
        "p": f8(order.price),
        "P": f8(order.stop_price),
        "F": f8(order.iceberg_quantity),
        "g": -1,
        "C": orig_client_id,
        "x": update.execution.value,
        "X": order.status.value,
        "r": "NONE",
        "i": order.order_id,
        "l": f8(fill.quantity if fill else Decimal(0)),
        "z": f8(order.executed_quantity),
        "L": f8(fill.price if fill else Decimal(0)),
        "n": f8(fill.commission) if fill else "0",
        "N": fill.commission_asset if fill else None,
        "T": ms(fill.time) if fill else ms(order.update_time),
        "t": fill.trade_id if fill else -1,
        "I": execution_id,
        "w": order.is_open and order.working,
        "m": fill.is_maker if fill else False,
        "M": False,
        "O": ms(order.time),
        "Z": f8(order.cumulative_quote_quantity),
        "Y": f8(fill.quote_quantity if fill else Decimal(0)),
        "Q": f8(order.quote_quantity),
        "W": ms(order.working_time),
        "V": order.self_trade_prevention.value,
    }
    if order.trailing_delta_bps is not None:
        out["d"] = order.trailing_delta_bps
        if order.trailing_time is not None:
            out["D"] = ms(order.trailing_time)
    return out


def account_position(updates: Iterable[BalanceUpdate], event_ms: int) -> dict[str, Any]:
    return {
        "e": "outboundAccountPosition",
        "E": event_ms,
        "u": event_ms,
        "B": [{"a": u.asset, "f": f8(u.free), "l": f8(u.locked)} for u in updates],
    }


def balance_update(asset: str, delta: Decimal, event_ms: int) -> dict[str, Any]:
    return {"e": "balanceUpdate", "E": event_ms, "a": asset, "d": f8(delta), "T": event_ms}
