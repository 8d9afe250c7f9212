"""The signed REST endpoints: orders (new, test, cancel, cancel-replace, queries), trades, the account,
its fees, and the wallet lists ccxt reads (``/sapi``)."""

from __future__ import annotations

import itertools
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from meltica.domain.enums import Side
from meltica.domain.values import utc_to_ms
from meltica.emulator import binance_format, errors
from meltica.emulator.config import EmulatorAccount
from meltica.emulator.core import EmulatorCore
from meltica.emulator.errors import BinanceError
from meltica.emulator.market import plain
from meltica.emulator.params import Params, Route, decimal_param, int_param, opt_int, required, spec_of
from meltica.matching import (
    CancelReplacePartialFailureError,
    EngineOrder,
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    ExecutionType,
    MatchResult,
    NewOrder,
    RejectReason,
    SelfTradePrevention,
)


class TradingEndpoints:
    """The signed endpoints of one emulator: what an account does with its orders and what it reads of them."""

    def __init__(self, emu: EmulatorCore) -> None:
        self.emu = emu
        self._client_ids = itertools.count(1)

    def routes(self) -> list[Route]:
        return [
            ("POST", "/api/v3/order", self.new_order),
            ("POST", "/api/v3/order/test", self.test_order),
            ("DELETE", "/api/v3/order", self.cancel_order),
            ("GET", "/api/v3/order", self.query_order),
            ("POST", "/api/v3/order/cancelReplace", self.cancel_replace),
            ("GET", "/api/v3/openOrders", self.open_orders),
            ("DELETE", "/api/v3/openOrders", self.cancel_all),
            ("GET", "/api/v3/allOrders", self.all_orders),
            ("GET", "/api/v3/myTrades", self.my_trades),
            ("GET", "/api/v3/account", self.account),
            ("GET", "/api/v3/account/commission", self.commission),
            ("GET", "/sapi/v1/asset/tradeFee", self.trade_fee),
            ("GET", "/sapi/v1/capital/config/getall", self.capital_config),
            ("GET", "/sapi/v1/margin/allPairs", self.no_margin),
            ("GET", "/sapi/v1/margin/isolated/allPairs", self.no_margin),
        ]

    def _new_order(self, params: Params, account: EmulatorAccount, prefix: str = "") -> NewOrder:
        """A ``NewOrder`` from Binance parameters; ``prefix`` is unused (cancelReplace shares names)."""
        spec = spec_of(self.emu.specs, params)
        side_text = required(params, "side").upper()
        if side_text not in ("BUY", "SELL"):
            raise errors.invalid_side()
        type_text = required(params, "type").upper()
        try:
            order_type = EngineOrderType(type_text)
        except ValueError:
            raise errors.invalid_order_type() from None
        quantity = decimal_param(params, "quantity", spec.base_precision)
        quote_qty = decimal_param(params, "quoteOrderQty", spec.quote_precision)
        price = decimal_param(params, "price", spec.quote_precision)
        stop_price = decimal_param(params, "stopPrice", spec.quote_precision)
        iceberg = decimal_param(params, "icebergQty", spec.base_precision)
        if iceberg is not None and quantity is not None and iceberg >= quantity:
            raise errors.iceberg_exceeds_quantity()
        trailing = opt_int(params, "trailingDelta")
        tif_text = params.get("timeInForce")
        tif = EngineTimeInForce.GTC
        expire_at: datetime | None = None
        if tif_text:
            if tif_text not in ("GTC", "IOC", "FOK", "GTD"):
                raise errors.invalid_tif()
            tif = EngineTimeInForce(tif_text)
        if tif is EngineTimeInForce.GTD:  # the extension (module docstring): Binance futures' parameter
            good_till = opt_int(params, "goodTillDate")
            if good_till is None:
                raise errors.mandatory_param("goodTillDate")
            expire_at = datetime.fromtimestamp(good_till / 1000, UTC)
        # mandatory parameters per type (rest-api.md, "New order" → "Other info")
        if order_type is EngineOrderType.MARKET:
            if quantity is None and quote_qty is None:
                raise BinanceError(-1102, "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!")
        else:
            if quantity is None:
                raise errors.mandatory_param("quantity")
        if order_type.is_limit_priced and price is None:
            raise errors.mandatory_param("price")
        needs_tif = (EngineOrderType.LIMIT, EngineOrderType.STOP_LOSS_LIMIT, EngineOrderType.TAKE_PROFIT_LIMIT)
        if order_type in needs_tif and not tif_text:
            raise errors.mandatory_param("timeInForce")
        if order_type.is_conditional and stop_price is None and trailing is None:
            raise BinanceError(-1102, "Param 'stopPrice' or 'trailingDelta' must be sent, but both were empty/null!")
        stp_text = params.get("selfTradePreventionMode") or "NONE"  # the symbol's default (exchangeInfo)
        try:
            stp = SelfTradePrevention(stp_text)
        except ValueError:
            raise errors.invalid_parameter("selfTradePreventionMode") from None
        client_id = params.get("newClientOrderId") or self._client_order_id()
        return NewOrder(
            account=account.name,
            symbol=spec.symbol,
            side=Side.BUY if side_text == "BUY" else Side.SELL,
            type=order_type,
            quantity=quantity,
            quote_quantity=quote_qty,
            price=price,
            stop_price=stop_price,
            trailing_delta_bps=trailing,
            iceberg_quantity=iceberg,
            time_in_force=tif,
            client_order_id=client_id,
            expire_at=expire_at,
            self_trade_prevention=stp,
        )

    def _refuse_market_on_empty_book(self, new: NewOrder) -> None:
        """Binance refuses a market order with nothing on the other side (-2010) rather than expiring it."""
        if new.type is not EngineOrderType.MARKET:
            return
        view = self.emu.engine.book(new.symbol, depth=1)
        if not (view.asks if new.side is Side.BUY else view.bids):
            raise errors.no_liquidity()

    def _client_order_id(self) -> str:
        return "emu" + secrets.token_hex(8) + str(next(self._client_ids))

    def _resp_type(self, params: Params, order_type: str) -> str:
        resp = (params.get("newOrderRespType") or binance_format.default_resp_type(order_type)).upper()
        if resp not in ("ACK", "RESULT", "FULL"):
            raise errors.invalid_parameter("newOrderRespType")
        return resp

    async def new_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        new = self._new_order(params, account)
        resp_type = self._resp_type(params, new.type.value)
        self._refuse_market_on_empty_book(new)
        try:
            result = self.emu.engine.submit(new)
        except EngineRejection as exc:
            raise map_rejection(exc, "new") from None
        self.emu.publisher.result(result)
        order = order_of(result, new.client_order_id)
        return binance_format.order_response(order, result.fills, resp_type)

    async def test_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        self._new_order(params, account)
        if params.get("computeCommissionRates", "").lower() == "true":
            f8 = binance_format.f8
            return {
                "standardCommissionForOrder": {
                    "maker": f8(self.emu.config.maker_fee),
                    "taker": f8(self.emu.config.taker_fee),
                },
                "specialCommissionForOrder": {"maker": f8(Decimal(0)), "taker": f8(Decimal(0))},
                "taxCommissionForOrder": {"maker": f8(Decimal(0)), "taker": f8(Decimal(0))},
                "discount": {
                    "enabledForAccount": False,
                    "enabledForSymbol": False,
                    "discountAsset": "BNB",
                    "discount": f8(Decimal(0)),
                },
            }
        return {}

    def _order_ref(self, params: Params, id_name: str, client_name: str) -> tuple[int | None, str | None]:
        order_id = opt_int(params, id_name)
        client_id = params.get(client_name) or None
        if order_id is None and client_id is None:
            raise BinanceError(-1102, f"Param '{client_name}' or '{id_name}' must be sent, but both were empty/null!")
        return order_id, client_id

    async def cancel_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        order_id, client_id = self._order_ref(params, "orderId", "origClientOrderId")
        cancel_id = params.get("newClientOrderId") or self._client_order_id()
        try:
            result = self.emu.engine.cancel(account.name, spec.symbol, order_id=order_id, client_order_id=client_id)
        except EngineRejection as exc:
            raise map_rejection(exc, "cancel") from None
        order = result.order
        if order is None:
            raise errors.cancel_rejected()
        self.emu.publisher.result(result, {order.order_id: cancel_id})
        return binance_format.cancel_response(order, cancel_id, self.emu.market_now())

    async def cancel_all(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        if not self.emu.engine.open_orders(account.name, spec.symbol):
            raise errors.cancel_rejected()
        result = self.emu.engine.cancel_all(account.name, spec.symbol)
        cancel_ids = {
            u.order.order_id: self._client_order_id()
            for u in result.order_updates
            if u.execution is ExecutionType.CANCELED
        }
        self.emu.publisher.result(result, cancel_ids)
        now = self.emu.market_now()
        return [
            binance_format.cancel_response(u.order, cancel_ids[u.order.order_id], now)
            for u in result.order_updates
            if u.execution is ExecutionType.CANCELED
        ]

    async def query_order(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        order_id, client_id = self._order_ref(params, "orderId", "origClientOrderId")
        try:
            order = self.emu.engine.get_order(account.name, spec.symbol, order_id=order_id, client_order_id=client_id)
        except EngineRejection:
            raise errors.no_such_order() from None
        return binance_format.order_query(order)

    async def cancel_replace(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        mode = required(params, "cancelReplaceMode").upper()
        if mode not in ("STOP_ON_FAILURE", "ALLOW_FAILURE"):
            raise errors.invalid_parameter("cancelReplaceMode")
        cancel_order_id, cancel_client_id = self._order_ref(params, "cancelOrderId", "cancelOrigClientOrderId")
        new = self._new_order(params, account)
        resp_type = self._resp_type(params, new.type.value)
        cancel_new_id = params.get("cancelNewClientOrderId") or self._client_order_id()
        now = self.emu.market_now()
        try:
            result = self.emu.engine.cancel_replace(
                account.name,
                spec.symbol,
                new,
                cancel_order_id=cancel_order_id,
                cancel_client_order_id=cancel_client_id,
            )
        except CancelReplacePartialFailureError as exc:
            cancelled = exc.cancel_result.order
            self.emu.publisher.result(exc.cancel_result, {cancelled.order_id: cancel_new_id} if cancelled else None)
            new_err = map_rejection(exc, "new")
            raise BinanceError(
                -2021,
                "Order cancel-replace partially failed.",
                409,
                {
                    "cancelResult": "SUCCESS",
                    "newOrderResult": "FAILURE",
                    "cancelResponse": binance_format.cancel_response(cancelled, cancel_new_id, now)
                    if cancelled
                    else None,
                    "newOrderResponse": {"code": new_err.code, "msg": new_err.msg},
                },
            ) from None
        except EngineRejection as exc:
            if exc.reject_reason is not RejectReason.UNKNOWN_ORDER:
                # the new order failed its checks before anything changed (filters are evaluated first)
                raise map_rejection(exc, "new") from None
            cancel_err = errors.cancel_rejected()
            if mode == "STOP_ON_FAILURE":
                raise BinanceError(
                    -2022,
                    "Order cancel-replace failed.",
                    400,
                    {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "NOT_ATTEMPTED",
                        "cancelResponse": cancel_err.body(),
                        "newOrderResponse": None,
                    },
                ) from None
            try:
                placed = self.emu.engine.submit(new)
            except EngineRejection as exc2:
                new_err = map_rejection(exc2, "new")
                raise BinanceError(
                    -2022,
                    "Order cancel-replace failed.",
                    400,
                    {
                        "cancelResult": "FAILURE",
                        "newOrderResult": "FAILURE",
                        "cancelResponse": cancel_err.body(),
                        "newOrderResponse": {"code": new_err.code, "msg": new_err.msg},
                    },
                ) from None
            self.emu.publisher.result(placed)
            order = order_of(placed, new.client_order_id)
            raise BinanceError(
                -2021,
                "Order cancel-replace partially failed.",
                409,
                {
                    "cancelResult": "FAILURE",
                    "newOrderResult": "SUCCESS",
                    "cancelResponse": cancel_err.body(),
                    "newOrderResponse": binance_format.order_response(order, placed.fills, resp_type),
                },
            ) from None
        cancelled_order = next((u.order for u in result.order_updates if u.execution is ExecutionType.CANCELED), None)
        self.emu.publisher.result(result, {cancelled_order.order_id: cancel_new_id} if cancelled_order else None)
        new_order = order_of(result, new.client_order_id)
        return {
            "cancelResult": "SUCCESS",
            "newOrderResult": "SUCCESS",
            "cancelResponse": binance_format.cancel_response(cancelled_order, cancel_new_id, now)
            if cancelled_order
            else None,
            "newOrderResponse": binance_format.order_response(new_order, result.fills, resp_type),
        }

    async def open_orders(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        symbol = None
        if params.get("symbol"):
            symbol = spec_of(self.emu.specs, params).symbol
        return [binance_format.order_query(o) for o in self.emu.engine.open_orders(account.name, symbol)]

    async def all_orders(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        orders = self.emu.engine.all_orders(account.name, spec.symbol)
        from_id = opt_int(params, "orderId")
        start = opt_int(params, "startTime")
        end = opt_int(params, "endTime")
        limit = min(int_param(params, "limit", 500), 1000)
        if from_id is not None:
            orders = [o for o in orders if o.order_id >= from_id]
        if start is not None:
            orders = [o for o in orders if utc_to_ms(o.time) >= start]
        if end is not None:
            orders = [o for o in orders if utc_to_ms(o.time) <= end]
        orders = orders[:limit] if (from_id is not None or start is not None) else orders[-limit:]
        return [binance_format.order_query(o) for o in orders]

    async def my_trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        fills = self.emu.engine.account_trades(account.name, spec.symbol)
        order_id = opt_int(params, "orderId")
        from_id = opt_int(params, "fromId")
        start = opt_int(params, "startTime")
        end = opt_int(params, "endTime")
        limit = min(int_param(params, "limit", 500), 1000)
        if order_id is not None:
            fills = [f for f in fills if f.order_id == order_id]
        if from_id is not None:
            fills = [f for f in fills if f.trade_id >= from_id]
        if start is not None:
            fills = [f for f in fills if utc_to_ms(f.time) >= start]
        if end is not None:
            fills = [f for f in fills if utc_to_ms(f.time) <= end]
        fills = fills[:limit] if (from_id is not None or start is not None) else fills[-limit:]
        return [binance_format.my_trade(f) for f in fills]

    async def account(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        balances = self.emu.engine.ledger.balances(account.name)
        if params.get("omitZeroBalances", "").lower() == "true":
            balances = {a: b for a, b in balances.items() if b.free or b.locked}
        uid = list(self.emu.accounts).index(account.name) + 1
        update_ms = self.emu.publisher.account_update_ms.get(account.name, 0)
        fees = self.emu.engine.fees(account.name)
        return binance_format.account(balances, fees.maker, fees.taker, update_ms, uid)

    async def commission(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        assert account is not None
        spec = spec_of(self.emu.specs, params)
        f8 = binance_format.f8
        zero = f8(Decimal(0))
        fees = self.emu.engine.fees(account.name)
        return {
            "symbol": spec.symbol,
            "standardCommission": {
                "maker": f8(fees.maker),
                "taker": f8(fees.taker),
                "buyer": zero,
                "seller": zero,
            },
            "specialCommission": {"maker": zero, "taker": zero, "buyer": zero, "seller": zero},
            "taxCommission": {"maker": zero, "taker": zero, "buyer": zero, "seller": zero},
            "discount": {
                "enabledForAccount": False,
                "enabledForSymbol": False,
                "discountAsset": "BNB",
                "discount": zero,
            },
        }

    async def trade_fee(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/sapi/v1/asset/tradeFee`` (ccxt ``fetch_trading_fees``): the account's rates per symbol (``symbol``:
        that one), written as Binance does (``"0.001"``, not 8 decimals)."""
        assert account is not None
        symbols = [spec_of(self.emu.specs, params).symbol] if params.get("symbol") else list(self.emu.specs)
        fees = self.emu.engine.fees(account.name)
        maker, taker = plain(fees.maker.normalize()), plain(fees.taker.normalize())
        return [{"symbol": s, "makerCommission": maker, "takerCommission": taker} for s in symbols]

    async def capital_config(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/sapi/v1/capital/config/getall`` (ccxt ``fetchCurrencies`` calls it when it has keys)."""
        assert account is not None
        assets: set[str] = set()
        for spec in self.emu.specs.values():
            assets |= {spec.base, spec.quote}
        balances = self.emu.engine.ledger.balances(account.name)
        assets |= set(balances)
        out = []
        for asset in sorted(assets):
            bal = balances.get(asset)
            free = bal.free if bal else Decimal(0)
            locked = bal.locked if bal else Decimal(0)
            out.append(
                {
                    "coin": asset,
                    "name": asset,
                    "depositAllEnable": True,
                    "withdrawAllEnable": True,
                    "free": binance_format.f8(free),
                    "locked": binance_format.f8(locked),
                    "freeze": "0",
                    "withdrawing": "0",
                    "ipoing": "0",
                    "ipoable": "0",
                    "storage": "0",
                    "isLegalMoney": False,
                    "trading": True,
                    "networkList": [
                        {
                            "network": asset,
                            "coin": asset,
                            "withdrawIntegerMultiple": "0.00000001",
                            "isDefault": True,
                            "depositEnable": True,
                            "withdrawEnable": True,
                            "depositDesc": "",
                            "withdrawDesc": "",
                            "specialTips": "",
                            "name": asset,
                            "resetAddressStatus": False,
                            "addressRegex": "",
                            "memoRegex": "",
                            "withdrawFee": "0",
                            "withdrawMin": "0",
                            "withdrawMax": "9999999999",
                            "minConfirm": 1,
                            "unLockConfirm": 0,
                            "sameAddress": False,
                            "estimatedArrivalTime": 1,
                            "busy": False,
                        }
                    ],
                }
            )
        return out

    async def no_margin(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """Margin pair lists (ccxt asks with ``fetchMargins``): the emulator trades spot only."""
        return []


def order_of(result: MatchResult, client_order_id: str | None) -> EngineOrder:
    """The last snapshot of the submitted order (found by its client order id)."""
    snapshots = [u.order for u in result.order_updates if u.order.client_order_id == client_order_id]
    if snapshots:
        return snapshots[-1]
    order = result.order
    if order is None:
        raise errors.internal_error()
    return order


_REJECTIONS: dict[RejectReason, tuple[int, str]] = {
    RejectReason.UNKNOWN_SYMBOL: (-1121, "Invalid symbol."),
    RejectReason.INSUFFICIENT_BALANCE: (-2010, "Account has insufficient balance for requested action."),
    RejectReason.PRICE_FILTER: (-1013, "Filter failure: PRICE_FILTER"),
    RejectReason.LOT_SIZE: (-1013, "Filter failure: LOT_SIZE"),
    RejectReason.MIN_NOTIONAL: (-1013, "Filter failure: NOTIONAL"),
    RejectReason.MAX_NUM_ORDERS: (-1013, "Filter failure: MAX_NUM_ORDERS"),
    RejectReason.WOULD_TAKE: (-2010, "Order would immediately match and take."),
    RejectReason.DUPLICATE_CLIENT_ORDER_ID: (-2010, "Duplicate order sent."),
    RejectReason.STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY: (-2010, "Order would trigger immediately."),
    RejectReason.FOK_NOT_FILLABLE: (-2010, "Order would not be fully filled."),
    RejectReason.INVALID_PARAMETERS: (-1013, "Unsupported order combination"),
}


def map_rejection(exc: EngineRejection, context: str) -> BinanceError:
    reason = exc.reject_reason
    if reason is RejectReason.UNKNOWN_ORDER:
        return errors.cancel_rejected() if context == "cancel" else errors.no_such_order()
    code, msg = _REJECTIONS.get(reason, (-1013, exc.message))
    if reason is RejectReason.INVALID_PARAMETERS and exc.message:
        msg = f"{msg}: {exc.message}" if not exc.message.startswith(msg) else exc.message
    return BinanceError(code, msg)
