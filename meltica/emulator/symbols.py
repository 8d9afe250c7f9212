"""The emulator's symbols: instruments for the matching engine and Binance ``exchangeInfo`` entries.

Filters for well-known symbols follow Binance spot's published values; other symbols get generic
ones. The exchangeInfo entry and the engine's ``Instrument`` are built from the same numbers, so the
filters ccxt reads are the filters the engine enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meltica.domain.instrument import Instrument
from meltica.errors import ConfigurationError

QUOTE_ASSETS = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")
ORDER_TYPES = ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT", "TAKE_PROFIT_LIMIT"]


@dataclass(frozen=True)
class SymbolSpec:
    symbol: str  # venue id, "BTCUSDT"
    base: str
    quote: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_price: Decimal
    max_price: Decimal
    min_notional: Decimal
    max_notional: Decimal = Decimal("9000000")
    base_precision: int = 8
    quote_precision: int = 8

    @property
    def unified(self) -> str:
        return f"{self.base}/{self.quote}"

    def instrument(self, maker_fee: Decimal, taker_fee: Decimal) -> Instrument:
        return Instrument(
            exchange="binance",
            symbol=self.unified,
            base=self.base,
            quote=self.quote,
            tick_size=self.tick_size,
            step_size=self.step_size,
            min_quantity=self.min_qty,
            max_quantity=self.max_qty,
            min_price=self.min_price,
            max_price=self.max_price,
            min_notional=self.min_notional,
            max_notional=self.max_notional,
            maker_fee=maker_fee,
            taker_fee=taker_fee,
        )

    def exchange_info(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "status": "TRADING",
            "baseAsset": self.base,
            "baseAssetPrecision": self.base_precision,
            "quoteAsset": self.quote,
            "quotePrecision": self.quote_precision,
            "quoteAssetPrecision": self.quote_precision,
            "baseCommissionPrecision": self.base_precision,
            "quoteCommissionPrecision": self.quote_precision,
            "orderTypes": list(ORDER_TYPES),
            "icebergAllowed": True,
            "ocoAllowed": False,
            "otoAllowed": False,
            "opoAllowed": False,
            "quoteOrderQtyMarketAllowed": True,
            "allowTrailingStop": True,
            "cancelReplaceAllowed": True,
            "amendAllowed": True,
            "pegInstructionsAllowed": False,
            "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "filters": [
                {
                    "filterType": "PRICE_FILTER",
                    "minPrice": fmt8(self.min_price),
                    "maxPrice": fmt8(self.max_price),
                    "tickSize": fmt8(self.tick_size),
                },
                {
                    "filterType": "LOT_SIZE",
                    "minQty": fmt8(self.min_qty),
                    "maxQty": fmt8(self.max_qty),
                    "stepSize": fmt8(self.step_size),
                },
                {"filterType": "ICEBERG_PARTS", "limit": 10},
                {
                    "filterType": "MARKET_LOT_SIZE",
                    "minQty": "0.00000000",
                    "maxQty": fmt8(self.max_qty),
                    "stepSize": "0.00000000",
                },
                {
                    "filterType": "TRAILING_DELTA",
                    "minTrailingAboveDelta": 10,
                    "maxTrailingAboveDelta": 2000,
                    "minTrailingBelowDelta": 10,
                    "maxTrailingBelowDelta": 2000,
                },
                {
                    "filterType": "MIN_NOTIONAL",
                    "minNotional": fmt8(self.min_notional),
                    "applyToMarket": True,
                    "avgPriceMins": 5,
                },
                {
                    "filterType": "NOTIONAL",
                    "minNotional": fmt8(self.min_notional),
                    "applyMinToMarket": True,
                    "maxNotional": fmt8(self.max_notional),
                    "applyMaxToMarket": False,
                    "avgPriceMins": 5,
                },
                {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
            ],
            "permissions": [],
            "permissionSets": [["SPOT"]],
            # NONE when an order names no mode (ccxt sends none): a driven run must equal the paper venue
            "defaultSelfTradePreventionMode": "NONE",
            "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
        }


def fmt8(value: Decimal) -> str:
    """Binance's fixed 8-decimal rendering (``"0.01000000"``)."""
    return f"{value:.8f}"


_D = Decimal
_KNOWN: dict[str, tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]] = {
    # symbol: tick, step, min qty, max qty, max price, min notional
    "BTCUSDT": (_D("0.01"), _D("0.00001"), _D("0.00001"), _D("9000"), _D("1000000"), _D("5")),
    "ETHUSDT": (_D("0.01"), _D("0.0001"), _D("0.0001"), _D("9000"), _D("1000000"), _D("5")),
    "BNBUSDT": (_D("0.01"), _D("0.001"), _D("0.001"), _D("9000"), _D("1000000"), _D("5")),
    "SOLUSDT": (_D("0.01"), _D("0.001"), _D("0.001"), _D("9000"), _D("1000000"), _D("5")),
    "XRPUSDT": (_D("0.0001"), _D("0.1"), _D("0.1"), _D("9000000"), _D("10000"), _D("5")),
    "ETHBTC": (_D("0.00001"), _D("0.0001"), _D("0.0001"), _D("100000"), _D("922327"), _D("0.0001")),
    "XRPETH": (_D("0.0000001"), _D("1"), _D("1"), _D("9000000"), _D("1000"), _D("0.001")),
}


def split_symbol(symbol: str) -> tuple[str, str]:
    for quote in QUOTE_ASSETS:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    raise ConfigurationError(
        f"symbol {symbol!r}: cannot tell base from quote (known quotes: {', '.join(QUOTE_ASSETS)})"
    )


def spec_for(symbol: str) -> SymbolSpec:
    symbol = symbol.upper()
    base, quote = split_symbol(symbol)
    tick, step, min_qty, max_qty, max_price, min_notional = _KNOWN.get(
        symbol, (_D("0.0001"), _D("0.001"), _D("0.001"), _D("9000000"), _D("1000000"), _D("1"))
    )
    return SymbolSpec(
        symbol=symbol,
        base=base,
        quote=quote,
        tick_size=tick,
        step_size=step,
        min_qty=min_qty,
        max_qty=max_qty,
        min_price=tick,
        max_price=max_price,
        min_notional=min_notional,
    )
