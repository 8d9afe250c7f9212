"""24-hour tickers and the top of book, as the REST tickers and the ticker streams both write them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from meltica.emulator import binance_format
from meltica.emulator.binance_format import f8
from meltica.emulator.market import SymbolMarket
from meltica.matching import MatchingEngine


def ticker_24h(engine: MatchingEngine, market: SymbolMarket, symbol: str, now: int) -> dict[str, Any]:
    """``/api/v3/ticker/24hr``'s row for ``symbol`` at market time ``now`` (ms)."""
    o, h, lo, vol, qvol, count, open_time = market.stats_24h(now)
    view = engine.book(symbol, depth=1)
    last = engine.last_price(symbol) or Decimal(0)
    trades = market.trades
    first_id = -1
    last_id = -1
    if trades:
        first_id, last_id = trades[0].trade_id, trades[-1].trade_id
    open_price = o if o is not None else last
    change = last - open_price
    pct = (change / open_price * 100) if open_price else Decimal(0)
    return {
        "symbol": symbol,
        "priceChange": binance_format.f8(change),
        "priceChangePercent": f"{pct:.3f}",
        "weightedAvgPrice": binance_format.f8(qvol / vol if vol else last),
        "prevClosePrice": binance_format.f8(open_price),
        "lastPrice": binance_format.f8(last),
        "lastQty": binance_format.f8(trades[-1].quantity if trades else Decimal(0)),
        "bidPrice": binance_format.f8(view.bids[0][0] if view.bids else Decimal(0)),
        "bidQty": binance_format.f8(view.bids[0][1] if view.bids else Decimal(0)),
        "askPrice": binance_format.f8(view.asks[0][0] if view.asks else Decimal(0)),
        "askQty": binance_format.f8(view.asks[0][1] if view.asks else Decimal(0)),
        "openPrice": binance_format.f8(open_price),
        "highPrice": binance_format.f8(h if h is not None else last),
        "lowPrice": binance_format.f8(lo if lo is not None else last),
        "volume": binance_format.f8(vol),
        "quoteVolume": binance_format.f8(qvol),
        "openTime": open_time,
        "closeTime": now,
        "firstId": first_id,
        "lastId": last_id,
        "count": count,
    }


def ticker_events(row: dict[str, Any], symbol: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``24hrTicker`` and ``24hrMiniTicker`` stream events of a ``ticker_24h`` row (web-socket-streams.md)."""
    t = row
    now = int(t["closeTime"])
    full = {
        "e": "24hrTicker",
        "E": now,
        "s": symbol,
        "p": t["priceChange"],
        "P": t["priceChangePercent"],
        "w": t["weightedAvgPrice"],
        "x": t["prevClosePrice"],
        "c": t["lastPrice"],
        "Q": t["lastQty"],
        "b": t["bidPrice"],
        "B": t["bidQty"],
        "a": t["askPrice"],
        "A": t["askQty"],
        "o": t["openPrice"],
        "h": t["highPrice"],
        "l": t["lowPrice"],
        "v": t["volume"],
        "q": t["quoteVolume"],
        "O": t["openTime"],
        "C": now,
        "F": t["firstId"],
        "L": t["lastId"],
        "n": t["count"],
    }
    mini = {"e": "24hrMiniTicker", "E": now, "s": symbol}
    mini |= {k: full[k] for k in ("c", "o", "h", "l", "v", "q")}
    return full, mini


def book_ticker_event(
    symbol: str, update_id: int, bid: tuple[Decimal, Decimal], ask: tuple[Decimal, Decimal]
) -> dict[str, Any]:
    """A ``<symbol>@bookTicker`` event (it has no event type on Binance)."""
    return {"u": update_id, "s": symbol, "b": f8(bid[0]), "B": f8(bid[1]), "a": f8(ask[0]), "A": f8(ask[1])}
