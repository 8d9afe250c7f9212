"""`meltica emulator` commands: run a local Binance-spot-compatible exchange for ccxt and tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
from decimal import Decimal
from pathlib import Path

import typer

from meltica.cli._common import console, reports_errors
from meltica.emulator import EmulatorAccount, EmulatorConfig, EmulatorServer, parse_account, parse_balances
from meltica.emulator.config import ADMIN_TOKEN_HEADER, generate_admin_token
from meltica.emulator.limits import RateLimits
from meltica.errors import ConfigurationError
from meltica.secrets import register_secret

API_SECRET_ENV = "MELTICA_EMULATOR_API_SECRET"  # noqa: S105 — a variable name, not a secret
ADMIN_TOKEN_ENV = "MELTICA_EMULATOR_ADMIN_TOKEN"  # noqa: S105 — a variable name, not a secret

app = typer.Typer(no_args_is_help=True)


@app.command()
@reports_errors
def binance(
    port: int = typer.Option(8090, help="TCP port (0: any free port)."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on. Anything but loopback (0.0.0.0: every interface) needs --allow-remote."
    ),
    allow_remote: bool = typer.Option(
        False,
        "--allow-remote",
        help="Allow a non-loopback --host: anyone who reaches the port can trade the accounts (the admin API "
        "still needs its token).",
    ),
    api_key: str = typer.Option(..., help="API key of the main account (not a secret)."),
    api_secret_file: Path | None = typer.Option(
        None,
        help=f"File holding the main account's API secret (HMAC). Default: the {API_SECRET_ENV} environment "
        "variable. There is no --api-secret: a command line is visible to every user (ps).",
    ),
    accounts_file: Path | None = typer.Option(
        None, help="More accounts: a file with one NAME:API_KEY:SECRET per line (blank lines and # comments skipped)."
    ),
    admin_token_file: Path | None = typer.Option(
        None,
        help=f"File holding the admin token every /_emulator/... request must send in the {ADMIN_TOKEN_HEADER} "
        f"header. Default: the {ADMIN_TOKEN_ENV} environment variable; neither: a random token, printed once.",
    ),
    write_admin_token: Path | None = typer.Option(
        None, help="With a generated admin token: also write it to this file (created with mode 0600)."
    ),
    api_secret: str | None = typer.Option(None, "--api-secret", hidden=True),
    account: list[str] = typer.Option([], "--account", hidden=True),
    balance: str = typer.Option("USDT=10000,BTC=1", help="Starting balance of every account, ASSET=AMOUNT,..."),
    data: list[Path] = typer.Option(
        [],
        help="Recorded data to replay (repeatable): candles (.csv[.gz]/.feather/.parquet), trades parquet, depth CSV.",
    ),
    symbols: str = typer.Option("BTCUSDT", help="Symbols to list, comma separated (venue ids)."),
    data_symbol: str | None = typer.Option(None, help="Symbol the data is replayed as (default: the first symbol)."),
    timeframe: str = typer.Option("1m", help="Timeframe of candle files."),
    data_volume: str = typer.Option(
        "base",
        help="What the candle files' volume column counts: base (BTC of BTCUSDT, as Binance klines) or quote "
        "(USDT; served as base = quote / the mean of open, high, low, close). The shipped "
        "meltica/data/btc-perp-... file is quote.",
    ),
    depth_from_volume: bool = typer.Option(
        True,
        "--depth-from-volume/--deep-book",
        help="--depth-from-volume: each synthetic book level holds a fifth of the replayed bar's base volume "
        "(larger orders walk the book). --deep-book: 1,000,000 per level (any size fills at the top).",
    ),
    realtime: bool = typer.Option(
        True,
        "--realtime/--data-time",
        help="--realtime: the data is moved to start now (first bar at now floored to its interval); server, "
        "order, trade, kline and ticker times are the wall clock; bars are played as trades along their path. "
        "--data-time: times are the recorded data's own.",
    ),
    speed: float = typer.Option(
        1.0,
        help="Replay speed, X times real time (1: a 1m bar lasts a minute). With --realtime and X != 1, market "
        "timestamps run X times faster than the wall clock from the start (serverTime stays the wall clock). "
        "0 = as fast as possible (--data-time only).",
    ),
    history_bars: int = typer.Option(
        0, help="With --realtime: the first N bars lie before now, already closed (history for a warm-up)."
    ),
    price: str = typer.Option(
        "", help="Starting prices for symbols without data, SYMBOL=PRICE,... (a synthetic book)."
    ),
    maker_fee: Decimal = typer.Option(Decimal("0.001"), help="Maker fee rate of every account."),
    taker_fee: Decimal = typer.Option(Decimal("0.001"), help="Taker fee rate of every account."),
    weight_limit: int = typer.Option(6000, help="Request weight per IP per --weight-interval (429 -1003 above)."),
    weight_interval: int = typer.Option(60, help="Request-weight window in seconds (header X-MBX-USED-WEIGHT-1M)."),
    order_limit: int = typer.Option(100, help="New orders per account per --order-interval (429 -1015 above)."),
    order_interval: int = typer.Option(10, help="Order-count window in seconds (header X-MBX-ORDER-COUNT-10S)."),
    daily_order_limit: int = typer.Option(200_000, help="New orders per account per UTC day (X-MBX-ORDER-COUNT-1D)."),
    ban_after: int = typer.Option(10, help="Requests sent while told to back off (429) before the IP is banned (418)."),
    ban_seconds: int = typer.Option(
        120, help="First ban's length in seconds; each further ban doubles it (max 3 days)."
    ),
    limits: bool = typer.Option(True, "--limits/--no-limits", help="Enforce the limits (--no-limits: headers only)."),
    ticker_interval: float = typer.Option(1.0, help="Seconds between @ticker/@miniTicker/!miniTicker@arr pushes."),
) -> None:
    """Serve Binance spot REST /api/v3, market streams and the user data stream.

    By default a real-time venue: recorded data replayed shifted to the wall clock at --speed 1.

    A local test venue: it listens on loopback only (another address needs --allow-remote).

    The main account's secret: --api-secret-file or MELTICA_EMULATOR_API_SECRET (never the command line).

    Admin API (/_emulator/...): the header X-Emulator-Admin-Token, see --admin-token-file (else printed at start).
    """
    if api_secret is not None:
        raise ConfigurationError(
            f"--api-secret puts the secret on the command line, where ps shows it to every user: "
            f"use --api-secret-file PATH or the {API_SECRET_ENV} environment variable",
            field="api_secret",
        )
    if account:
        raise ConfigurationError(
            "--account NAME:KEY:SECRET puts a secret on the command line, where ps shows it to every user: "
            "use --accounts-file PATH (one NAME:KEY:SECRET per line)",
            field="account",
        )
    secret = _secret(api_secret_file, API_SECRET_ENV, "--api-secret-file", "the main account's API secret")
    if secret is None:
        raise ConfigurationError(
            f"the main account's API secret is missing: --api-secret-file PATH or {API_SECRET_ENV}",
            field="api_secret",
        )
    admin_token = _secret(admin_token_file, ADMIN_TOKEN_ENV, "--admin-token-file", "the admin token")
    generated = admin_token is None
    if not generated and write_admin_token is not None:
        raise ConfigurationError(
            "--write-admin-token only writes a generated token (one is given)", field="admin_token"
        )
    if admin_token is None:
        admin_token = generate_admin_token()
    accounts = [EmulatorAccount("main", api_key, secret), *_accounts(accounts_file)]
    register_secret(admin_token, *(a.api_secret for a in accounts))
    try:
        rate_limits = RateLimits(
            request_weight=weight_limit,
            weight_interval_s=weight_interval,
            orders=order_limit,
            orders_interval_s=order_interval,
            orders_per_day=daily_order_limit,
            ban_after_429s=ban_after,
            ban_s=ban_seconds,
            max_ban_s=max(ban_seconds, 3 * 86_400),
            enabled=limits,
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    config = EmulatorConfig(
        accounts=accounts,
        default_balances=parse_balances(balance),
        symbols=[s.strip() for s in symbols.split(",") if s.strip()],
        host=host,
        port=port,
        allow_remote=allow_remote,
        admin_token=admin_token,
        data=list(data),
        data_symbol=data_symbol,
        candle_timeframe=timeframe,
        data_volume=data_volume,
        depth_from_volume=depth_from_volume,
        speed=speed,
        realtime=realtime,
        history_bars=history_bars,
        maker_fee=maker_fee,
        taker_fee=taker_fee,
        initial_prices=_prices(price),
        rate_limits=rate_limits,
        ticker_interval_s=ticker_interval,
    )
    if write_admin_token is not None:
        _write_private(write_admin_token, admin_token)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, show_token=generated))


def _secret(path: Path | None, env: str, flag: str, what: str) -> str | None:
    """A secret from ``path`` (first line, surrounding white space dropped), else from ``env``; ``None``: neither."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{flag} {path}: cannot read {what}: {exc.__class__.__name__}") from None
        value = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise ConfigurationError(f"{flag} {path}: the file is empty")
        return value
    value = os.environ.get(env, "").strip()
    return value or None


def _accounts(path: Path | None) -> list[EmulatorAccount]:
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--accounts-file {path}: cannot read it: {exc.__class__.__name__}") from None
    out = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(parse_account(line))
        except ConfigurationError as exc:
            raise ConfigurationError(f"--accounts-file {path}, line {number}: {exc}") from None
    return out


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (never widened, even for a moment)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"--write-admin-token {path}: cannot write it: {exc.strerror}") from None


def _prices(text: str) -> dict[str, Decimal]:
    """``"BTCUSDT=40000,ETHUSDT=2500"`` → starting prices; every price must be positive."""
    try:
        prices = parse_balances(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--price: {exc}".replace("balance ", "")) from None
    for symbol, value in prices.items():
        if value <= 0:
            raise ConfigurationError(f"--price {symbol}: the price must be positive")
    return prices


async def _serve(config: EmulatorConfig, *, show_token: bool) -> None:
    async with EmulatorServer(config) as emu:
        mode = f"real time x{config.speed:g}" if config.realtime else f"data time x{config.speed:g}"
        console.print(
            f"binance emulator on {emu.rest_url} (ws {emu.ws_url}); {len(emu.events)} events to replay ({mode})"
        )
        console.print(f"accounts: {', '.join(emu.accounts)}; symbols: {', '.join(emu.specs)}")
        console.print("ccxt: urls['api'] = emu.ccxt_urls(), options={'fetchMarkets': {'types': ['spot']}}")
        lim = config.rate_limits
        console.print(
            f"limits{'' if lim.enabled else ' (reported, not enforced)'}: {lim.request_weight} weight per "
            f"{lim.weight_interval_s} s per IP, {lim.orders} orders per {lim.orders_interval_s} s and "
            f"{lim.orders_per_day} per day per account"
        )
        if config.allow_remote:
            console.print(f"[bold yellow]warning:[/] listening on {config.host}, reachable from other machines")
        if show_token:
            # printed once, here only: the generated token is not stored anywhere unless asked
            console.print(
                f"admin token ({ADMIN_TOKEN_HEADER} header): {emu.admin_token}", highlight=False, soft_wrap=True
            )
        console.print(
            f"admin: {emu.rest_url}/_emulator/faults (JSON, header {ADMIN_TOKEN_HEADER}) and others; Ctrl-C stops"
        )
        await asyncio.Event().wait()
