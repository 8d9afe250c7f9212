"""`meltica demo`: the main job on embedded defaults.

Starts the local infrastructure, migrates the database, loads the shipped real BTC/USDT perpetual
1-minute month, and prints what is stored with a 1-hour roll-up of it. Later stages (backtest, live
paper trading) extend this same command. Step 5 backtests the momentum strategy (EMA 10/50) on the month,
writes its report to ``./out/demo-backtest/`` and stores the run. Step 6 runs the live pipeline in paper
mode: a bounded replay of the same bars through Kafka, a stream worker and the exchange emulator, with
live PnL, results in ``./out/demo-paper/`` and orders/fills stored by the sink worker.
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import typer
from sqlalchemy import Engine

from meltica import infra
from meltica.cli._common import console, database_engine, reports_errors, schema_at_head
from meltica.cli.data_cmd import candle_table, summary_table
from meltica.infra.kafka import ensure_kafka
from meltica.marketdata.candle_files import read_candle_file
from meltica.storage import candles, migrate
from meltica.storage.engine import masked
from meltica.storage.timeseries import detect_flavour

DEMO_DATASET = Path(__file__).resolve().parents[1] / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
DEMO_EXCHANGE = "binance"
DEMO_SYMBOL = "BTC/USDT:USDT"
DEMO_TIMEFRAME = "1m"


@reports_errors
def demo(
    hours: int = typer.Option(24, help="How many of the last 1-hour bars to print."),
    kafka: bool = typer.Option(True, help="Also start the local Kafka broker."),
    paper_bars: int = typer.Option(
        480, "--paper-bars", help="Bars the live paper step replays through Kafka (0: skip the step)."
    ),
) -> None:
    """Run the main job on embedded defaults."""
    console.rule("[bold]1. local infrastructure")
    t0 = time.monotonic()
    infra.up(kafka=kafka)
    console.print(infra.status_table())
    console.print(f"infrastructure ready in {time.monotonic() - t0:.1f} s")

    console.rule("[bold]2. database schema")
    engine = database_engine()
    schema_at_head(engine)
    with engine.connect() as conn:
        flavour = detect_flavour(conn)
    console.print(f"{masked(engine.url)} at revision {migrate.current_revision(engine)} ({flavour})")

    console.rule("[bold]3. load the shipped real BTC/USDT perpetual 1-minute history")
    t0 = time.monotonic()
    parsed = read_candle_file(DEMO_DATASET, DEMO_TIMEFRAME)
    result = candles.load_candles(
        engine, parsed.rows, exchange=DEMO_EXCHANGE, symbol=DEMO_SYMBOL, timeframe=DEMO_TIMEFRAME
    )
    console.print(
        f"{DEMO_DATASET.name}: read {result.read} bars, stored {result.inserted} new, "
        f"{result.already_stored} already stored, in {time.monotonic() - t0:.2f} s"
    )

    console.rule("[bold]4. what is stored")
    console.print(summary_table(candles.candle_summary(engine)))
    hourly = candles.read_candles(engine, exchange=DEMO_EXCHANGE, symbol=DEMO_SYMBOL, timeframe="1h")
    shown = hourly[-hours:] if hours > 0 else []
    console.print(
        candle_table(
            shown,
            title=f"{DEMO_EXCHANGE} {DEMO_SYMBOL} 1h roll-up of 1m bars — last {len(shown)} of {len(hourly)} hours",
        )
    )

    console.rule("[bold]5. backtest: momentum (EMA 10/50) on the shipped month")
    from meltica.backtest import BacktestConfig, BarSeries, run_backtest, write_report
    from meltica.cli.backtest_cmd import summary_table as backtest_summary

    bars = BarSeries.from_file(DEMO_DATASET, exchange=DEMO_EXCHANGE, symbol=DEMO_SYMBOL, timeframe=DEMO_TIMEFRAME)
    config = BacktestConfig.create(
        strategy="momentum",
        params={"symbol": DEMO_SYMBOL, "fast": 10, "slow": 50, "quantity": "0.1"},
        exchange=DEMO_EXCHANGE,
        symbol=DEMO_SYMBOL,
        timeframe=DEMO_TIMEFRAME,
        taker_fee_bps=4,
        maker_fee_bps=2,
        slippage_bps=1,
    )
    t0 = time.monotonic()
    backtest = run_backtest(config, bars)
    elapsed = time.monotonic() - t0
    out = Path("out") / "demo-backtest"
    backtest.write_files(out)
    write_report(backtest, out, prices={DEMO_SYMBOL: bars.closes()})
    backtest.save(engine)
    console.print(backtest_summary(backtest))
    console.print(
        f"{len(bars)} bars in {elapsed:.1f} s ({len(bars) / elapsed:,.0f} bars/s); report: {out / 'report.html'}; "
        f"stored as run {backtest.run_id}"
    )
    if kafka and paper_bars > 0:
        _paper_step(engine, paper_bars)
    console.print(
        "next: `meltica paper --strategy momentum --param symbol=BTC/USDT --data "
        "meltica/data/btc-perp-20211231-20220201_1m.csv.gz --max-bars 600 --venue emulator --output out/paper`, "
        "`meltica backtest --strategy momentum --param symbol=BTC/USDT:USDT --symbol BTC/USDT:USDT "
        "--exchange binance --output out/bt`, `meltica data show --exchange binance --symbol BTC/USDT:USDT "
        "--timeframe 1d`, `meltica infra down`"
    )


def _paper_step(engine: Engine, bars: int) -> None:
    """Step 6: the live pipeline in paper mode — the shipped bars replayed through Kafka into a stream
    worker (strategy host, risk gate, execution) trading on the exchange emulator through ccxt, with sink
    workers storing orders and fills; live PnL printed; it ends by itself after ``bars`` bars."""
    from meltica.backtest import BacktestConfig, BarSeries, run_backtest
    from meltica.live.paper import run_paper, with_emulator_instrument

    console.rule(f"[bold]6. live paper trading: {bars} bars through Kafka, stream workers and the exchange emulator")
    symbol = "BTC/USDT"  # the emulator is a spot venue: the perpetual's bars are replayed as its spot market
    config = with_emulator_instrument(
        BacktestConfig.create(
            strategy="momentum",
            params={"symbol": symbol, "fast": 5, "slow": 20, "quantity": "0.1"},
            exchange=DEMO_EXCHANGE,
            symbol=symbol,
            timeframe=DEMO_TIMEFRAME,
            taker_fee_bps=4,
            maker_fee_bps=2,
            initial_balances={"USDT": Decimal(100_000), "BTC": Decimal(1)},
        )
    )
    out = Path("out") / "demo-paper"
    run = run_paper(
        config,
        DEMO_DATASET,
        bootstrap=ensure_kafka().bootstrap_servers,
        output=out,
        max_bars=bars,
        venue="emulator",
        say=console.print,
        report_every=60,
        timeout=600,
        database_url=engine.url.render_as_string(hide_password=False),
    )
    series = BarSeries.from_file(DEMO_DATASET, exchange=DEMO_EXCHANGE, symbol=symbol, timeframe=DEMO_TIMEFRAME)
    backtest = run_backtest(config, list(series.bars())[:bars])
    same = [(f.price, f.quantity, f.fee, f.ts) for f in backtest.fills] == [
        (f.price, f.quantity, f.fee, f.ts) for f in run.result.fills
    ]
    console.print(
        f"{run.bars_published} bars in {run.seconds:.1f} s; {len(run.result.orders)} orders, "
        f"{len(run.result.fills)} fills stored by the sinks; final equity {run.collector.equity_now():.2f} USDT; "
        f"same fills as a backtest of the same bars: {'yes' if same else 'NO'}; report: {out / 'report.html'}"
    )
