"""`meltica paper`: run one strategy through the live pipeline (Kafka, stream worker, risk gate,
execution against the paper venue or the exchange emulator) on a replay of a candle file; stops when
the replay ends and writes what `meltica backtest --output` writes."""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

from pathlib import Path

import typer

from meltica import infra
from meltica.cli._common import console, reports_errors
from meltica.cli.backtest_cmd import _decimal, parse_param, print_warnings, summary_table
from meltica.errors import ConfigurationError
from meltica.infra.kafka import ensure_kafka


@reports_errors
def paper(
    strategy: str = typer.Option(
        ..., "--strategy", help="A registered name (e.g. momentum), path/to/file.py:Class or module:Class."
    ),
    param: list[str] = typer.Option([], "--param", help="Strategy parameter key=value (repeatable)."),
    data: Path = typer.Option(..., "--data", help="Candle file to replay (.csv, .csv.gz, .feather, .parquet)."),
    speed: float = typer.Option(0.0, "--speed", help="Replay speed: X times real time; 0 = as fast as it goes."),
    output: Path = typer.Option(..., "--output", help="Directory for metrics.json, CSVs, report.html, PNGs."),
    exchange: str = typer.Option("binance", help="Exchange id of the replayed market."),
    symbol: str = typer.Option("BTC/USDT", help="Unified symbol traded."),
    timeframe: str = typer.Option("1m", help="Bar timeframe of the file (the live path is 1m)."),
    max_bars: int | None = typer.Option(None, "--max-bars", help="Replay only the first N bars."),
    venue: str = typer.Option("paper", "--venue", help="paper (in-process venue) or emulator (ccxt → emulator)."),
    fees_bps: str = typer.Option("10", "--fees-bps", help="Taker (and default maker) fee in bps."),
    maker_fees_bps: str | None = typer.Option(None, "--maker-fees-bps", help="Maker fee in bps (default: --fees-bps)."),
    slippage_bps: str = typer.Option("0", "--slippage-bps", help="Taker slippage in bps."),
    balance: list[str] = typer.Option([], "--balance", help="Initial balance ASSET=AMOUNT (repeatable)."),
    keep_topics: bool = typer.Option(False, "--keep-topics", help="Keep the run's Kafka topics for inspection."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up when the replay has not ended after this many s."),
) -> None:
    """Paper-trade STRATEGY on a replay of --data through the live pipeline; write results into --output."""
    from meltica.backtest import BacktestConfig
    from meltica.live.paper import run_paper

    if timeframe != "1m":
        raise ConfigurationError("the live pipeline replays 1-minute bars (md.candles.1m)", field="timeframe")
    if venue not in ("paper", "emulator"):
        raise ConfigurationError(f"--venue {venue!r}: expected paper or emulator", field="venue")
    balances: dict[str, str] = {}
    for item in balance:
        asset, sep, amount = item.partition("=")
        if not sep:
            raise ConfigurationError(f"--balance {item!r}: expected ASSET=AMOUNT", field="balance")
        balances[asset.strip()] = amount.strip()
    config = BacktestConfig.create(
        strategy=strategy,
        params=dict(parse_param(p) for p in param),
        exchange=exchange,
        symbol=symbol,
        timeframe=timeframe,
        taker_fee_bps=_decimal(fees_bps, "fees-bps"),
        maker_fee_bps=_decimal(maker_fees_bps or fees_bps, "maker-fees-bps"),
        slippage_bps=_decimal(slippage_bps, "slippage-bps"),
        initial_balances=balances,
    )
    infra.up(kafka=True)
    endpoint = ensure_kafka()
    console.print(f"paper run: {strategy} on {data.name} ({venue} venue), broker {endpoint.bootstrap_servers}")
    run = run_paper(
        config,
        data,
        bootstrap=endpoint.bootstrap_servers,
        output=output,
        speed=speed,
        max_bars=max_bars,
        venue=venue,
        say=console.print,
        keep_topics=keep_topics,
        timeout=timeout,
    )
    console.print(summary_table(run.result))
    print_warnings(run.result.warnings)
    console.print(
        f"{run.bars_published} bars through the pipeline in {run.seconds:.1f} s "
        f"({run.bars_published / run.seconds:.0f} bars/s); {len(run.result.orders)} orders, "
        f"{len(run.result.fills)} fills; topics {run.prefix}*"
    )
    console.print(f"results in {output}/ (metrics.json, orders.csv, fills.csv, equity.csv, trades.csv, report.html)")
