"""Binance's REST limits (``rest-api.md`` → LIMITS): request weight per IP, order count per account.

* **Request weight** — every REST request costs its endpoint's weight (:func:`request_weight`, the
  documented table) in a fixed window (default one minute, aligned to the epoch like Binance's); every
  answer carries ``X-MBX-USED-WEIGHT-<n><S|M|H|D>`` (``-1M`` by default). Over the limit: HTTP 429,
  ``-1003``, ``Retry-After`` = seconds until the window ends, and the IP must back off until then.
* **Ban** — each request sent while told to back off is a strike; at ``ban_after_429s`` strikes the IP
  is banned: HTTP 418, ``-1003`` "IP banned until …", ``Retry-After`` = seconds left, for ``ban_s``
  seconds, doubled for each further ban (at most ``max_ban_s``, Binance: 2 minutes to 3 days).
* **Order count** — new orders per account in a short window (default 100 per 10 s) and per UTC day
  (200 000); ``X-MBX-ORDER-COUNT-10S`` / ``-1D`` on order answers; over: HTTP 429, ``-1015``,
  ``Retry-After`` until the window ends. (Binance's decrement for filled orders is not modelled.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meltica.emulator.errors import BinanceError

_DAY_S = 86_400


@dataclass(frozen=True)
class RateLimits:
    """The limits the emulator enforces; the defaults are Binance spot's."""

    request_weight: int = 6000  # per IP per ``weight_interval_s``
    weight_interval_s: int = 60
    orders: int = 100  # per account per ``orders_interval_s``
    orders_interval_s: int = 10
    orders_per_day: int = 200_000
    ban_after_429s: int = 10  # requests sent while backing off before the IP is banned (418)
    ban_s: int = 120
    max_ban_s: int = 3 * _DAY_S
    enabled: bool = True  # False: count and report (headers), never refuse

    def __post_init__(self) -> None:
        for name in ("request_weight", "weight_interval_s", "orders", "orders_interval_s", "orders_per_day"):
            if getattr(self, name) < 1:
                raise ValueError(f"rate limit {name} must be at least 1")
        if self.ban_after_429s < 1 or self.ban_s < 1 or self.max_ban_s < self.ban_s:
            raise ValueError("ban_after_429s and ban_s must be at least 1, max_ban_s at least ban_s")

    def exchange_info(self) -> list[dict[str, object]]:
        """The ``rateLimits`` array of ``/api/v3/exchangeInfo``."""
        return [
            _limit_entry("REQUEST_WEIGHT", self.weight_interval_s, self.request_weight),
            _limit_entry("ORDERS", self.orders_interval_s, self.orders),
            _limit_entry("ORDERS", _DAY_S, self.orders_per_day),
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
        ]


def interval_label(seconds: int) -> str:
    """A window as Binance writes it in header names: 60 → ``1M``, 10 → ``10S``, 86400 → ``1D``."""
    for unit, letter in ((_DAY_S, "D"), (3600, "H"), (60, "M")):
        if seconds % unit == 0:
            return f"{seconds // unit}{letter}"
    return f"{seconds}S"


_UNITS = {"D": "DAY", "H": "HOUR", "M": "MINUTE", "S": "SECOND"}


def _interval(seconds: int) -> tuple[int, str]:
    """60 → ``(1, "MINUTE")``: Binance's ``intervalNum`` and ``interval``."""
    label = interval_label(seconds)
    return int(label[:-1]), _UNITS[label[-1]]


def _limit_entry(kind: str, seconds: int, limit: int) -> dict[str, object]:
    num, unit = _interval(seconds)
    return {"rateLimitType": kind, "interval": unit, "intervalNum": num, "limit": limit}


@dataclass
class _Window:
    start_ms: int = 0
    used: int = 0

    def roll(self, now_ms: int, length_ms: int) -> None:
        start = now_ms // length_ms * length_ms
        if start != self.start_ms:
            self.start_ms, self.used = start, 0

    def left_s(self, now_ms: int, length_ms: int) -> int:
        return max(1, math.ceil((self.start_ms + length_ms - now_ms) / 1000))


@dataclass
class _IpState:
    weight: _Window = field(default_factory=_Window)
    backoff_until_ms: int = 0
    strikes: int = 0
    banned_until_ms: int = 0
    bans: int = 0


@dataclass
class _AccountOrders:
    short: _Window = field(default_factory=_Window)
    day: _Window = field(default_factory=_Window)


class RateLimiter:
    """The counters behind :class:`RateLimits`; times are the server's wall clock in epoch ms."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._ips: dict[str, _IpState] = {}
        self._accounts: dict[str, _AccountOrders] = {}
        self.weight_header = f"X-MBX-USED-WEIGHT-{interval_label(limits.weight_interval_s)}"
        self.orders_header = f"X-MBX-ORDER-COUNT-{interval_label(limits.orders_interval_s)}"
        self.day_orders_header = "X-MBX-ORDER-COUNT-1D"

    def used_weight(self, ip: str, now_ms: int) -> int:
        state = self._ips.setdefault(ip, _IpState())
        state.weight.roll(now_ms, self.limits.weight_interval_s * 1000)
        return state.weight.used

    def admit(self, ip: str, weight: int, now_ms: int, *, enforce: bool = True) -> dict[str, str]:
        """Charge ``weight`` to ``ip``; the headers to answer with. Raises the 429/418 ``BinanceError``
        (its ``headers`` carry ``Retry-After``) when the request is refused."""
        lim = self.limits
        length = lim.weight_interval_s * 1000
        state = self._ips.setdefault(ip, _IpState())
        state.weight.roll(now_ms, length)
        enforce = enforce and lim.enabled
        if enforce and now_ms < state.banned_until_ms:
            raise self._banned(state, now_ms)
        if enforce and now_ms < state.backoff_until_ms:
            state.strikes += 1
            if state.strikes >= lim.ban_after_429s:
                ban_s = min(lim.max_ban_s, lim.ban_s * 2**state.bans)
                state.bans += 1
                state.strikes = 0
                state.backoff_until_ms = 0
                state.banned_until_ms = now_ms + ban_s * 1000
                raise self._banned(state, now_ms)
            raise self._too_much_weight(state, now_ms)
        if enforce and state.weight.used + weight > lim.request_weight:
            state.backoff_until_ms = state.weight.start_ms + length
            state.strikes = 0
            raise self._too_much_weight(state, now_ms)
        state.weight.used += weight
        return {self.weight_header: str(state.weight.used)}

    def count_order(self, account: str, now_ms: int, *, enforce: bool = True) -> dict[str, str]:
        """Count one new order of ``account``; the order-count headers. Raises the 429 -1015 error."""
        lim = self.limits
        short_len, day_len = lim.orders_interval_s * 1000, _DAY_S * 1000
        state = self._accounts.setdefault(account, _AccountOrders())
        state.short.roll(now_ms, short_len)
        state.day.roll(now_ms, day_len)
        if enforce and lim.enabled:
            for window, length, limit in (
                (state.short, short_len, lim.orders),
                (state.day, day_len, lim.orders_per_day),
            ):
                if window.used + 1 > limit:
                    num, unit = _interval(length // 1000)
                    err = BinanceError(
                        -1015, f"Too many new orders; current limit is {limit} orders per {num} {unit}.", 429
                    )
                    err.headers = {"Retry-After": str(window.left_s(now_ms, length)), **self._order_headers(state)}
                    raise err
        state.short.used += 1
        state.day.used += 1
        return self._order_headers(state)

    def _order_headers(self, state: _AccountOrders) -> dict[str, str]:
        return {self.orders_header: str(state.short.used), self.day_orders_header: str(state.day.used)}

    def _too_much_weight(self, state: _IpState, now_ms: int) -> BinanceError:
        lim = self.limits
        num, unit = _interval(lim.weight_interval_s)
        err = BinanceError(
            -1003,
            f"Too much request weight used; current limit is {lim.request_weight} request weight per "
            f"{num} {unit}. Please use WebSocket Streams for live updates to avoid polling the API.",
            429,
        )
        retry = max(1, math.ceil((state.backoff_until_ms - now_ms) / 1000))
        err.headers = {"Retry-After": str(retry), self.weight_header: str(state.weight.used)}
        return err

    def _banned(self, state: _IpState, now_ms: int) -> BinanceError:
        err = BinanceError(
            -1003,
            f"Way too much request weight used; IP banned until {state.banned_until_ms}. "
            "Please use WebSocket Streams for live updates to avoid bans.",
            418,
        )
        retry = max(1, math.ceil((state.banned_until_ms - now_ms) / 1000))
        err.headers = {"Retry-After": str(retry), self.weight_header: str(state.weight.used)}
        return err


def request_weight(method: str, path: str, params: dict[str, str]) -> int:
    """The documented weight of one REST request (``rest-api.md``, each endpoint's "Weight")."""
    if path.startswith("/sapi/"):
        return 0  # SAPI endpoints have their own limits on Binance, not the /api/v3 weight
    key = (method.upper(), path)
    if key in _FIXED:
        return _FIXED[key]
    has_symbol = bool(params.get("symbol"))
    if path == "/api/v3/depth":
        limit = _int_or(params.get("limit"), 100)
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    if path == "/api/v3/ticker/24hr":
        if has_symbol:
            return 2
        n = _count_symbols(params.get("symbols"))
        return 80 if n is None or n > 100 else 2 if n <= 20 else 40
    if path in ("/api/v3/ticker/price", "/api/v3/ticker/bookTicker"):
        return 2 if has_symbol else 4
    if key == ("GET", "/api/v3/openOrders"):
        return 6 if has_symbol else 80
    if path == "/api/v3/myTrades":
        return 5 if params.get("orderId") else 20
    if path == "/api/v3/order/test":
        return 20 if params.get("computeCommissionRates", "").lower() == "true" else 1
    return 1


_FIXED: dict[tuple[str, str], int] = {
    ("GET", "/api/v3/ping"): 1,
    ("GET", "/api/v3/time"): 1,
    ("GET", "/api/v3/exchangeInfo"): 20,
    ("GET", "/api/v3/trades"): 25,
    ("GET", "/api/v3/historicalTrades"): 25,
    ("GET", "/api/v3/aggTrades"): 4,
    ("GET", "/api/v3/klines"): 2,
    ("GET", "/api/v3/uiKlines"): 2,
    ("GET", "/api/v3/avgPrice"): 2,
    ("POST", "/api/v3/order"): 1,
    ("DELETE", "/api/v3/order"): 1,
    ("GET", "/api/v3/order"): 4,
    ("POST", "/api/v3/order/cancelReplace"): 1,
    ("DELETE", "/api/v3/openOrders"): 1,
    ("GET", "/api/v3/allOrders"): 20,
    ("GET", "/api/v3/account"): 20,
    ("GET", "/api/v3/account/commission"): 20,
    ("POST", "/api/v3/userDataStream"): 2,
    ("PUT", "/api/v3/userDataStream"): 2,
    ("DELETE", "/api/v3/userDataStream"): 2,
}


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _count_symbols(text: str | None) -> int | None:
    if not text:
        return None
    return text.count(",") + 1
