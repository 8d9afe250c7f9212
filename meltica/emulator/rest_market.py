"""The public REST endpoints (``/api/v3``): ping, time, exchange info, depth, trades, klines, tickers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from aiohttp import web

from meltica.emulator import binance_format, errors
from meltica.emulator.binance_format import f8
from meltica.emulator.config import EmulatorAccount
from meltica.emulator.core import EmulatorCore
from meltica.emulator.market import interval_ms
from meltica.emulator.params import Params, Route, int_param, opt_int, required, spec_of, symbol_list
from meltica.emulator.tickers import ticker_24h


class MarketDataEndpoints:
    """The unsigned market-data endpoints of one emulator."""

    def __init__(self, emu: EmulatorCore) -> None:
        self.emu = emu

    def routes(self) -> list[Route]:
        return [
            ("GET", "/api/v3/ping", self.ping),
            ("GET", "/api/v3/time", self.time),
            ("GET", "/api/v3/exchangeInfo", self.exchange_info),
            ("GET", "/api/v3/depth", self.depth),
            ("GET", "/api/v3/trades", self.trades),
            ("GET", "/api/v3/historicalTrades", self.trades),
            ("GET", "/api/v3/aggTrades", self.agg_trades),
            ("GET", "/api/v3/klines", self.klines),
            ("GET", "/api/v3/uiKlines", self.klines),
            ("GET", "/api/v3/ticker/24hr", self.ticker_24hr),
            ("GET", "/api/v3/ticker/price", self.ticker_price),
            ("GET", "/api/v3/ticker/bookTicker", self.book_ticker),
            ("GET", "/api/v3/avgPrice", self.avg_price),
        ]

    async def ping(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        return {}

    async def time(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        return {"serverTime": self.emu.server_ms()}

    async def exchange_info(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        emu = self.emu
        wanted = symbol_list(params)
        if wanted is not None:
            for s in wanted:
                if s not in emu.specs:
                    raise errors.bad_symbol()
        return {
            "timezone": "UTC",
            "serverTime": emu.server_ms(),
            "rateLimits": emu.config.rate_limits.exchange_info(),
            "exchangeFilters": [],
            "symbols": [spec.exchange_info() for s, spec in emu.specs.items() if wanted is None or s in wanted],
        }

    async def depth(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = spec_of(self.emu.specs, params)
        limit = min(int_param(params, "limit", 100), 5000)
        uid = self.emu.publisher.sync_book(spec.symbol)
        view = self.emu.engine.book(spec.symbol, depth=limit)
        return {
            "lastUpdateId": uid,
            "bids": [[f8(p), f8(q)] for p, q in view.bids],
            "asks": [[f8(p), f8(q)] for p, q in view.asks],
        }

    async def trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = spec_of(self.emu.specs, params)
        limit = min(int_param(params, "limit", 500), 1000)
        trades = list(self.emu.markets[spec.symbol].trades)
        from_id = params.get("fromId")
        if from_id:
            trades = [t for t in trades if t.trade_id >= int(from_id)][:limit]
        else:
            trades = trades[-limit:] if limit > 0 else []
        return [t.rest() for t in trades]

    async def agg_trades(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        """``/api/v3/aggTrades``: fromId, or a startTime/endTime window (inclusive), oldest first."""
        spec = spec_of(self.emu.specs, params)
        limit = min(int_param(params, "limit", 500), 1000)
        trades = list(self.emu.markets[spec.symbol].trades)
        from_id = params.get("fromId")
        start = opt_int(params, "startTime")
        end = opt_int(params, "endTime")
        if from_id:
            trades = [t for t in trades if t.trade_id >= int(from_id)]
        if start is not None:
            trades = [t for t in trades if t.time_ms >= start]
        if end is not None:
            trades = [t for t in trades if t.time_ms <= end]
        # With a lower bound: the oldest `limit` from it; without one: the most recent `limit`.
        bounded = bool(from_id) or start is not None
        selected = trades[:limit] if bounded else trades[-limit:] if limit > 0 else []
        return [t.agg() for t in selected]

    async def klines(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = spec_of(self.emu.specs, params)
        interval = required(params, "interval")
        interval_ms(interval)
        limit = min(int_param(params, "limit", 500), 1000)
        start = opt_int(params, "startTime")
        end = opt_int(params, "endTime")
        rows = self.emu.markets[spec.symbol].klines(interval, start, end, limit)
        return [k.rest_row() for k in rows]

    def _ticker(self, symbol: str) -> dict[str, Any]:
        return ticker_24h(self.emu.engine, self.emu.markets[symbol], symbol, self.emu.market_ms())

    def _symbols_param(self, params: Params) -> tuple[list[str], bool]:
        """The symbols asked for and whether the answer is a single object (``symbol=``)."""
        if params.get("symbol"):
            return [spec_of(self.emu.specs, params).symbol], True
        wanted = symbol_list(params)
        if wanted is None:
            return list(self.emu.specs), False
        for s in wanted:
            if s not in self.emu.specs:
                raise errors.bad_symbol()
        return wanted, False

    async def ticker_24hr(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        kind = (params.get("type") or "FULL").upper()
        if kind not in ("FULL", "MINI"):
            raise errors.invalid_parameter("type")
        rows = [self._ticker(s) for s in symbols]
        if kind == "MINI":
            mini = [
                *("symbol", "openPrice", "highPrice", "lowPrice", "lastPrice", "volume", "quoteVolume"),
                *("openTime", "closeTime", "firstId", "lastId", "count"),
            ]
            rows = [{k: row[k] for k in mini} for row in rows]
        return rows[0] if single else rows

    async def ticker_price(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        engine = self.emu.engine
        rows = [{"symbol": s, "price": binance_format.f8(engine.last_price(s) or Decimal(0))} for s in symbols]
        return rows[0] if single else rows

    async def book_ticker(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        symbols, single = self._symbols_param(params)
        rows = []
        for s in symbols:
            view = self.emu.engine.book(s, depth=1)
            rows.append(
                {
                    "symbol": s,
                    "bidPrice": binance_format.f8(view.bids[0][0] if view.bids else Decimal(0)),
                    "bidQty": binance_format.f8(view.bids[0][1] if view.bids else Decimal(0)),
                    "askPrice": binance_format.f8(view.asks[0][0] if view.asks else Decimal(0)),
                    "askQty": binance_format.f8(view.asks[0][1] if view.asks else Decimal(0)),
                }
            )
        return rows[0] if single else rows

    async def avg_price(self, request: web.Request, params: Params, account: EmulatorAccount | None) -> Any:
        spec = spec_of(self.emu.specs, params)
        rows = self.emu.markets[spec.symbol].klines("1m", limit=5)
        vol = sum((k.volume for k in rows), Decimal(0))
        qvol = sum((k.quote_volume for k in rows), Decimal(0))
        price = qvol / vol if vol else (self.emu.engine.last_price(spec.symbol) or Decimal(0))
        return {"mins": 5, "price": binance_format.f8(price), "closeTime": self.emu.market_ms()}
