"""`meltica emulator` commands: run a local Binance-spot-compatible exchange for ccxt and tests."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import typer

from meltica.cli._common import console, reports_errors
from meltica.emulator import AccountConfig, EmulatorConfig, EmulatorServer, parse_account, parse_balances

app = typer.Typer(no_args_is_help=True)


@app.command()
@reports_errors
def binance(
    port: int = typer.Option(8090, help="TCP port on 127.0.0.1 (0: any free port)."),
    api_key: str = typer.Option(..., help="API key of the main account."),
    api_secret: str = typer.Option(..., help="API secret (HMAC) of the main account."),
    account: list[str] = typer.Option([], help="More accounts, NAME:API_KEY:SECRET (repeatable)."),
    balance: str = typer.Option("USDT=10000,BTC=1", help="Starting balance of every account, ASSET=AMOUNT,..."),
    data: list[Path] = typer.Option([], help="Recorded data to replay: candles, trades parquet, depth CSV."),
    speed: float = typer.Option(1.0, help="Replay speed: X times real time; 0 = as fast as possible."),
    symbols: str = typer.Option("BTCUSDT", help="Symbols to list, comma separated (venue ids)."),
    data_symbol: str | None = typer.Option(None, help="Symbol the data is replayed as (default: first symbol)."),
    timeframe: str = typer.Option("1m", help="Timeframe of candle files."),
) -> None:
    """Serve Binance spot REST /api/v3, market streams and the user data stream on 127.0.0.1."""
    accounts = [AccountConfig("main", api_key, api_secret), *(parse_account(a) for a in account)]
    config = EmulatorConfig(
        accounts=accounts,
        default_balances=parse_balances(balance),
        symbols=[s.strip() for s in symbols.split(",") if s.strip()],
        port=port,
        data=list(data),
        data_symbol=data_symbol,
        candle_timeframe=timeframe,
        speed=speed,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))


async def _serve(config: EmulatorConfig) -> None:
    async with EmulatorServer(config) as emu:
        console.print(f"binance emulator on {emu.rest_url} (ws {emu.ws_url}); {len(emu.events)} events to replay")
        console.print(f"accounts: {', '.join(emu.accounts)}; symbols: {', '.join(emu.specs)}")
        console.print("ccxt: urls['api'] = emu.ccxt_urls(), options={'fetchMarkets': {'types': ['spot']}}")
        console.print(f"faults: POST {emu.rest_url}/_emulator/faults (JSON); Ctrl-C stops")
        await asyncio.Event().wait()
