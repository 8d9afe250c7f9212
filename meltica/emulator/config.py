"""Emulator configuration: accounts (API key pairs), starting balances, symbols, data, speed, limits."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from meltica.emulator.limits import RateLimits
from meltica.errors import ConfigurationError
from meltica.matching import FeeSchedule, FillModel

ADMIN_TOKEN_HEADER = "X-Emulator-Admin-Token"  # noqa: S105 — a header name, not a secret
MIN_ADMIN_TOKEN_LENGTH = 16


def system_clock() -> datetime:
    """Wall-clock time, aware UTC: the server clock Binance checks ``timestamp``/``recvWindow`` against."""
    return datetime.now(UTC)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only listens on this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name (may resolve anywhere) or "" (every interface)
        return False


def generate_admin_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class EmulatorAccount:
    name: str
    api_key: str
    api_secret: str = field(repr=False)
    # Starting balances for this account; ``None``: the emulator's ``default_balances``.
    balances: dict[str, Decimal] | None = None
    # This account's fee schedule (a backtest's ``FeeSchedule`` for paper parity); ``None``: the
    # emulator's ``maker_fee`` / ``taker_fee``, commission in the asset received.
    fees: FeeSchedule | None = None


@dataclass
class EmulatorConfig:
    accounts: list[EmulatorAccount]
    default_balances: dict[str, Decimal] = field(default_factory=lambda: {"USDT": Decimal(10_000), "BTC": Decimal(1)})
    symbols: list[str] = field(default_factory=lambda: ["BTCUSDT"])
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port (``emu.port`` tells which)
    # Listening on anything but loopback exposes every account (and the admin API, behind its token) to
    # the network: refused unless asked for explicitly.
    allow_remote: bool = False
    # Every ``/_emulator/...`` request must carry it in the ``X-Emulator-Admin-Token`` header; ``None``:
    # a random one is generated (``emu.admin_token``).
    admin_token: str | None = field(default=None, repr=False)
    # Recorded market data to replay: candle files (.csv[.gz], .feather, .parquet with OHLCV), a trades
    # parquet (columns timestamp, trade_id, price, quantity, buyer_maker) or a Binance depth CSV
    # (snapshot or update rows). ``data_symbol`` is the symbol they are replayed as (default: first).
    data: list[Path] = field(default_factory=list)
    data_symbol: str | None = None
    candle_timeframe: str = "1m"
    # What the candle files' volume column counts: "base" (Binance klines: BTC of BTCUSDT) or "quote"
    # (USDT; served as base = quote / the mean of the bar's open, high, low and close). The shipped
    # ``meltica/data/btc-perp-...`` file holds quote volume.
    data_volume: str = "base"
    # Replayed bars size the synthetic book: each of its levels holds the bar's base volume × the fill
    # model's ``bar_volume_share`` (1 when unset) / ``synthetic_levels`` (at least one lot), so an order
    # larger than the bar's trading walks the book. False: the fill model's fixed
    # ``synthetic_level_quantity`` (1,000,000 by default: any size fills at the top). A driven market
    # (lock-step) is never changed by it: there the driver's fill model decides, as in the backtest.
    depth_from_volume: bool = True
    # Replay speed: X times real time; 0 = as fast as possible; None = manual (``await emu.step()``).
    speed: float | None = None
    # Real-time venue: the data is shifted so its first bar opens at "now" floored to the bar's
    # interval (first trade/book event: at now), and market time is the wall clock (at ``speed`` ≠ 1:
    # it runs at that speed from the start). Bars are played as trades along their path. ``speed``
    # None means 1 here; 0 is refused.
    realtime: bool = False
    # Real time: the first N bars are placed before now (closed at start: klines to warm up on).
    history_bars: int = 0
    # Request-weight and order-count limits (Binance spot's by default); not enforced while the market
    # is driven in lock-step (``/_emulator/market/*``), whose time is not the wall clock.
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # How often ``@ticker`` / ``@miniTicker`` / ``!miniTicker@arr`` / ``@bookTicker`` are pushed (Binance: 1 s).
    ticker_interval_s: float = 1.0
    maker_fee: Decimal = Decimal("0.001")
    taker_fee: Decimal = Decimal("0.001")
    # How the engine turns market data into fills (a backtest's ``FillModel`` for paper parity).
    fill_model: FillModel | None = None
    # Wall clock (server time for the recvWindow check). Market time is the replayed data's time.
    clock: Callable[[], datetime] = system_clock
    # A starting price for symbols without data, so MARKET orders find (synthetic) liquidity at once.
    initial_prices: dict[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.allow_remote and not is_loopback_host(self.host):
            raise ConfigurationError(
                f"the emulator would listen on {self.host or 'every interface'!r}, not only on this machine: "
                "anyone who can reach it could trade its accounts. Use 127.0.0.1, or allow it explicitly "
                "(allow_remote=True; CLI: --allow-remote)",
                field="host",
            )
        if self.admin_token is None:
            self.admin_token = generate_admin_token()
        elif len(self.admin_token) < MIN_ADMIN_TOKEN_LENGTH or not _header_safe(self.admin_token):
            # the value itself is never echoed: it is a secret
            raise ConfigurationError(
                f"the emulator's admin token must be at least {MIN_ADMIN_TOKEN_LENGTH} printable ASCII "
                "characters without spaces",
                field="admin_token",
            )
        if not self.accounts:
            raise ConfigurationError("the emulator needs at least one account (API key pair)")
        keys = [a.api_key for a in self.accounts]
        if len(set(keys)) != len(keys):
            raise ConfigurationError("two emulator accounts share an API key")
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ConfigurationError("two emulator accounts share a name")
        self.symbols = [s.upper() for s in self.symbols]
        if not self.symbols:
            raise ConfigurationError("the emulator needs at least one symbol")
        if self.speed is not None and self.speed < 0:
            raise ConfigurationError("speed must be >= 0")
        if self.realtime:
            if self.speed is None:
                self.speed = 1.0
            if self.speed == 0:
                raise ConfigurationError(
                    "a real-time emulator needs a speed > 0 "
                    "(speed 0, as fast as possible, replays in the data's own time: --data-time)"
                )
        if self.data_volume not in ("base", "quote"):
            raise ConfigurationError(f"data_volume must be 'base' or 'quote', not {self.data_volume!r}")
        if self.history_bars < 0:
            raise ConfigurationError("history_bars must be >= 0")
        if not self.ticker_interval_s > 0:
            raise ConfigurationError("ticker_interval_s must be > 0")

    @classmethod
    def single(cls, api_key: str, api_secret: str, **kwargs: object) -> EmulatorConfig:
        """One account named ``main``: the common test setup."""
        return cls(accounts=[EmulatorAccount("main", api_key, api_secret)], **kwargs)  # type: ignore[arg-type]


def _header_safe(token: str) -> bool:
    return all(33 <= ord(c) <= 126 for c in token)


def parse_balances(text: str) -> dict[str, Decimal]:
    """``"USDT=10000,BTC=1"`` → ``{"USDT": Decimal("10000"), "BTC": Decimal("1")}``."""
    out: dict[str, Decimal] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        asset, sep, amount = part.partition("=")
        if not sep or not asset.strip():
            raise ConfigurationError(f"balance {part!r}: expected ASSET=AMOUNT")
        try:
            value = Decimal(amount.strip())
        except ArithmeticError:
            raise ConfigurationError(f"balance {part!r}: {amount!r} is not a number") from None
        if not value.is_finite() or value < 0:
            raise ConfigurationError(f"balance {part!r}: amount must be a non-negative number")
        out[asset.strip().upper()] = value
    return out


def parse_account(text: str) -> EmulatorAccount:
    """``"NAME:KEY:SECRET"`` → an account."""
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise ConfigurationError(f"account {text.split(':')[0]!r}: expected NAME:KEY:SECRET")
    return EmulatorAccount(parts[0], parts[1], parts[2])
