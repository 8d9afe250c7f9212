"""`meltica emulator` commands: run a local Binance-spot-compatible exchange for ccxt and tests."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from pathlib import Path

import typer

from meltica.cli._common import console, reports_errors
from meltica.emulator import AccountConfig, EmulatorConfig, EmulatorServer, parse_account, parse_balances
from meltica.emulator.limits import RateLimits
from meltica.errors import ConfigurationError

app = typer.Typer(no_args_is_help=True)


@app.command()
@reports_errors
def binance(
    port: int = typer.Option(8090, help="TCP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    api_key: str = typer.Option(..., help="API key of the main account."),
    api_secret: str = typer.Option(..., help="API secret (HMAC) of the main account."),
    account: list[str] = typer.Option([], help="More accounts, NAME:API_KEY:SECRET (repeatable)."),
    balance: str = typer.Option("USDT=10000,BTC=1", help="Starting balance of every account, ASSET=AMOUNT,..."),
    data: list[Path] = typer.Option(
        [],
        help="Recorded data to replay (repeatable): candles (.csv[.gz]/.feather/.parquet), trades parquet, depth CSV.",
    ),
    symbols: str = typer.Option("BTCUSDT", help="Symbols to list, comma separated (venue ids)."),
    data_symbol: str | None = typer.Option(None, help="Symbol the data is replayed as (default: the first symbol)."),
    timeframe: str = typer.Option("1m", help="Timeframe of candle files."),
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
    """
    accounts = [AccountConfig("main", api_key, api_secret), *(parse_account(a) for a in account)]
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
        data=list(data),
        data_symbol=data_symbol,
        candle_timeframe=timeframe,
        speed=speed,
        realtime=realtime,
        history_bars=history_bars,
        maker_fee=maker_fee,
        taker_fee=taker_fee,
        initial_prices=_prices(price),
        rate_limits=rate_limits,
        ticker_interval_s=ticker_interval,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))


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


async def _serve(config: EmulatorConfig) -> None:
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
        console.print(f"faults: POST {emu.rest_url}/_emulator/faults (JSON); Ctrl-C stops")
        await asyncio.Event().wait()
