"""What the emulator publishes as the market and the orders change: depth diffs and partial books, public
trades, klines, tickers, and each account's executions (user stream and the execution journal)."""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from meltica.domain.enums import Side
from meltica.domain.values import utc_to_ms
from meltica.emulator import binance_format
from meltica.emulator.binance_format import f8
from meltica.emulator.errors import BinanceError
from meltica.emulator.market import Kline, MarketTrade, SymbolMarket, interval_ms, plain
from meltica.emulator.streams import StreamHub
from meltica.emulator.symbols import SymbolSpec
from meltica.emulator.tickers import book_ticker_event, ticker_24h, ticker_events
from meltica.matching import ExecutionReport, MatchingEngine, MatchResult

_PARTIAL_DEPTH = re.compile(r"^([a-z0-9]+)@depth(5|10|20)(@100ms|@1000ms)?$")


class Publisher:
    """Publishes to the stream hub what changed in the engine and the public market, at market time."""

    def __init__(
        self,
        hub: StreamHub,
        engine: MatchingEngine,
        specs: Mapping[str, SymbolSpec],
        markets: Mapping[str, SymbolMarket],
        accounts: Iterable[str],
        market_ms: Callable[[], int],
    ) -> None:
        self.hub = hub
        self.engine = engine
        self.specs = specs
        self.markets = markets
        self.market_ms = market_ms
        # published book per symbol: (bids, asks, last update id), so diffs and /depth agree
        self._books: dict[str, tuple[dict[Decimal, Decimal], dict[Decimal, Decimal], int]] = {
            s: ({}, {}, 1) for s in specs
        }
        self._execution_ids = itertools.count(1)
        self.account_update_ms: dict[str, int] = {}  # account → event time of its last position update
        # Every execution per account (bounded), for drivers waiting on their user stream.
        self._journal: dict[str, deque[dict[str, Any]]] = {a: deque(maxlen=100_000) for a in accounts}
        self._kline_sent: dict[str, tuple[int, bool]] = {}  # kline stream → (open time, final) last sent

    # --- the book --------------------------------------------------------------------------------------

    def sync_book(self, symbol: str) -> int:
        """Publish the difference between the last published book and the engine's; return the update id."""
        bids_old, asks_old, uid = self._books[symbol]
        view = self.engine.book(symbol)
        bids_new = {p: q for p, q in view.bids}
        asks_new = {p: q for p, q in view.asks}
        b_diff = _diff(bids_old, bids_new)
        a_diff = _diff(asks_old, asks_new)
        if not b_diff and not a_diff:
            return uid
        uid += 1
        self._books[symbol] = (bids_new, asks_new, uid)
        low = symbol.lower()
        event = {
            "e": "depthUpdate",
            "E": self.market_ms(),
            "s": symbol,
            "U": uid,
            "u": uid,
            "b": [[f8(p), f8(q)] for p, q in b_diff],
            "a": [[f8(p), f8(q)] for p, q in a_diff],
        }
        for name in (f"{low}@depth", f"{low}@depth@100ms", f"{low}@depth@1000ms"):
            self.hub.publish(name, event)
        for stream in self.hub.subscribed():
            match = _PARTIAL_DEPTH.match(stream)
            if match and match.group(1) == low:
                levels = int(match.group(2))
                self.hub.publish(
                    stream,
                    {
                        "lastUpdateId": uid,
                        "bids": [[f8(p), f8(q)] for p, q in view.bids[:levels]],
                        "asks": [[f8(p), f8(q)] for p, q in view.asks[:levels]],
                    },
                )
        book_ticker = f"{low}@bookTicker"
        if self.hub.has_subscribers(book_ticker) and view.bids and view.asks:
            self.hub.publish(book_ticker, book_ticker_event(symbol, uid, view.bids[0], view.asks[0]))
        return uid

    def book_update_id(self, symbol: str) -> int:
        """The last update id published on ``symbol``'s depth streams (Binance ``u``/``lastUpdateId``)."""
        return self._books[symbol][2]

    # --- public trades and klines ----------------------------------------------------------------------

    def public_trade(self, symbol: str, trade: MarketTrade) -> None:
        self.markets[symbol].on_trade(trade)
        low = symbol.lower()
        event_ms = self.market_ms()
        self.hub.publish(
            f"{low}@trade",
            {
                "e": "trade",
                "E": event_ms,
                "s": symbol,
                "t": trade.trade_id,
                "p": f8(trade.price),
                "q": f8(trade.quantity),
                "T": trade.time_ms,
                "m": trade.buyer_maker,
                "M": True,
            },
        )
        self.hub.publish(
            f"{low}@aggTrade",
            {
                "e": "aggTrade",
                "E": event_ms,
                "s": symbol,
                "a": trade.trade_id,
                "p": f8(trade.price),
                "q": f8(trade.quantity),
                "f": trade.trade_id,
                "l": trade.trade_id,
                "T": trade.time_ms,
                "m": trade.buyer_maker,
                "M": True,
            },
        )

    def klines(self, symbol: str, at_ms: int | None = None) -> None:
        """The current kline of every subscribed ``<symbol>@kline_<i>`` stream (as of ``at_ms``, default
        market time); a kline that ended since the stream's last event is first sent once more, final
        (``x: true``), as Binance does."""
        low = symbol.lower()
        prefix = f"{low}@kline_"
        now = self.market_ms() if at_ms is None else at_ms
        for stream in self.hub.subscribed():
            if not stream.startswith(prefix):
                continue
            interval = stream[len(prefix) :]
            try:
                kline = self.markets[symbol].current_kline(interval, now)
            except BinanceError:
                continue
            if kline is None:
                kline = self.markets[symbol].latest_kline(interval)
            if kline is None:
                continue
            sent = self._kline_sent.get(stream)
            if sent is not None and not sent[1] and sent[0] < kline.open_time:
                previous = self.markets[symbol].current_kline(interval, sent[0])
                if previous is not None:
                    self._send_kline(stream, symbol, interval, previous, now)
            self._send_kline(stream, symbol, interval, kline, now)

    def _send_kline(self, stream: str, symbol: str, interval: str, kline: Kline, now: int) -> None:
        kline.closed = kline.close_time < now  # a fresh copy: marks only what is published
        if self._kline_sent.get(stream) == (kline.open_time, True):
            return  # its final event went out already
        self._kline_sent[stream] = (kline.open_time, kline.closed)
        self.hub.publish(stream, {"e": "kline", "E": now, "s": symbol, "k": kline.stream_payload(symbol, interval)})

    def close_klines(self) -> None:
        """Final events for klines whose interval ended with no later event (no trade since)."""
        now = self.market_ms()
        for stream, (open_ms, closed) in list(self._kline_sent.items()):
            if closed or not self.hub.has_subscribers(stream):
                continue
            low, _, interval = stream.partition("@kline_")
            symbol = low.upper()
            if symbol not in self.markets or open_ms + interval_ms(interval) > now:
                continue
            kline = self.markets[symbol].current_kline(interval, open_ms)
            if kline is not None:
                self._send_kline(stream, symbol, interval, kline, now)

    # --- the engine's results ---------------------------------------------------------------------------

    def result(self, result: MatchResult, cancel_client_ids: Mapping[int, str] | None = None) -> None:
        """A match result: execution reports and positions to the accounts' user streams, the trades it
        printed, and the klines and books of the symbols it touched."""
        event_ms = self.market_ms()
        for update in result.order_updates:
            cancel_id = (cancel_client_ids or {}).get(update.order.order_id)
            seq = next(self._execution_ids)
            report = binance_format.execution_report(update, event_ms, seq, cancel_id)
            self._journal_execution(seq, update)
            self.hub.publish_user(update.order.account, report)
        by_account: dict[str, list[Any]] = {}
        for bal in result.balance_updates:
            by_account.setdefault(bal.account, []).append(bal)
        for account, updates in by_account.items():
            self.account_update_ms[account] = event_ms
            self.hub.publish_user(account, binance_format.account_position(updates, event_ms))
        # public trades: between user orders (engine) and user takers against recorded liquidity
        seen: set[tuple[str, int]] = set()
        for trade in result.public_trades:
            seen.add((trade.symbol, trade.trade_id))
            self.public_trade(
                trade.symbol,
                MarketTrade(trade.trade_id, trade.price, trade.quantity, utc_to_ms(trade.time), trade.is_buyer_maker),
            )
        for fill in result.fills:
            if fill.is_maker or (fill.symbol, fill.trade_id) in seen:
                continue
            seen.add((fill.symbol, fill.trade_id))
            self.public_trade(
                fill.symbol,
                MarketTrade(fill.trade_id, fill.price, fill.quantity, utc_to_ms(fill.time), fill.side is Side.SELL),
            )
        for symbol in {f.symbol for f in result.fills} | {u.order.symbol for u in result.order_updates}:
            if symbol in self.specs:
                self.klines(symbol)
                self.sync_book(symbol)

    def _journal_execution(self, seq: int, update: ExecutionReport) -> None:
        order, fill = update.order, update.fill
        journal = self._journal.get(order.account)
        if journal is None:
            return
        journal.append(
            {
                "seq": seq,
                "symbol": order.symbol,
                "client_order_id": order.client_order_id,
                "order_id": order.order_id,
                "execution_type": update.execution.value,
                "status": order.status.value,
                "executed_quantity": plain(order.executed_quantity),
                "trade_id": fill.trade_id if fill is not None else None,
            }
        )

    def executions(self, account: str, after: int = 0) -> list[dict[str, Any]]:
        """The account's executions with a sequence number (``executionReport`` ``I``) above ``after``."""
        newer: list[dict[str, Any]] = []
        for entry in reversed(self._journal.get(account, ())):  # ascending seq: read back from the end
            if entry["seq"] <= after:
                break
            newer.append(entry)
        newer.reverse()
        return newer

    @property
    def last_execution_seq(self) -> int:
        return max((j[-1]["seq"] for j in self._journal.values() if j), default=0)

    # --- tickers -----------------------------------------------------------------------------------------

    def tickers(self) -> None:
        """``<symbol>@ticker``, ``@miniTicker``, ``@bookTicker``, ``!ticker@arr``, ``!miniTicker@arr`` now."""
        streams = self.hub.subscribed()
        if not streams:
            return
        want_all_full = "!ticker@arr" in streams
        want_all_mini = "!miniTicker@arr" in streams
        full_rows: list[dict[str, Any]] = []
        mini_rows: list[dict[str, Any]] = []
        for symbol in self.specs:
            low = symbol.lower()
            names = (f"{low}@ticker", f"{low}@miniTicker", f"{low}@bookTicker")
            if not (want_all_full or want_all_mini or any(n in streams for n in names)):
                continue
            if self.engine.last_price(symbol) is None:
                continue  # nothing traded yet: Binance lists no ticker either
            row = ticker_24h(self.engine, self.markets[symbol], symbol, self.market_ms())
            full, mini = ticker_events(row, symbol)
            if names[0] in streams:
                self.hub.publish(names[0], full)
            if names[1] in streams:
                self.hub.publish(names[1], mini)
            if names[2] in streams:
                view = self.engine.book(symbol, depth=1)
                if view.bids and view.asks:
                    uid = self.sync_book(symbol)
                    self.hub.publish(names[2], book_ticker_event(symbol, uid, view.bids[0], view.asks[0]))
            full_rows.append(full)
            mini_rows.append(mini)
        if want_all_full and full_rows:
            self.hub.publish("!ticker@arr", full_rows)
        if want_all_mini and mini_rows:
            self.hub.publish("!miniTicker@arr", mini_rows)


def _diff(old: dict[Decimal, Decimal], new: dict[Decimal, Decimal]) -> list[tuple[Decimal, Decimal]]:
    out = [(p, q) for p, q in new.items() if old.get(p) != q]
    out += [(p, Decimal(0)) for p in old if p not in new]
    return sorted(out)
