"""The ``meltica`` command line: one Typer app with a sub-app per area."""

from __future__ import annotations

import logging
import os

import typer

from meltica.cli import (
    backtest_cmd,
    config_cmd,
    data_cmd,
    db_cmd,
    demo_cmd,
    emulator_cmd,
    flows_cmd,
    infra_cmd,
    keys_cmd,
    kill_cmd,
    live_cmd,
    optimize_cmd,
    paper_cmd,
    reports_cmd,
    status_cmd,
    strategies_cmd,
    streams_cmd,
)
from meltica.config import load_settings
from meltica.errors import MelticaError
from meltica.secrets import install_log_redaction
from meltica.secrets.redaction import print_exception_redacted

app = typer.Typer(
    name="meltica",
    help="Meltica: crypto auto-trading — local infrastructure, database, market data, configuration and API "
    "keys; strategies, backtests, parameter sweeps and paper runs; the live pipeline (Kafka workers, live "
    "deployments, kill switch, status); Prefect flows and reconciliation; a local exchange emulator. "
    "Start with `meltica demo`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)
app.add_typer(infra_cmd.app, name="infra", help="Start, stop and inspect the local infrastructure.")
app.add_typer(
    db_cmd.app,
    name="db",
    help="Database migrations, as the owner role (database_migration_url / MELTICA_DATABASE_MIGRATION_URL).",
)
app.add_typer(data_cmd.app, name="data", help="Load and show market data.")
app.add_typer(config_cmd.app, name="config", help="Show and validate configuration.")
app.add_typer(keys_cmd.app, name="keys", help="Manage encrypted exchange API credentials.")
app.add_typer(emulator_cmd.app, name="emulator", help="Run a local Binance-compatible exchange emulator.")
app.add_typer(kill_cmd.app, name="kill", help="Kill switch: halt or reduce-only, by hand; show its state.")
app.add_typer(flows_cmd.app, name="flows", help="Prefect deployments: deploy the flows, list them, run a server.")
app.add_typer(
    reports_cmd.app, name="reports", help="Serve the stored backtest reports (report.html, charts) over HTTP."
)
app.add_typer(streams_cmd.app, name="streams", help="Kafka topics and workers of the live pipeline.")
app.add_typer(
    strategies_cmd.app,
    name="strategies",
    help="The registered strategies and where they come from (your own: file.py:Class, module:Class, "
    "strategy_paths, entry points).",
)
app.add_typer(live_cmd.app, name="live", help="Trade live: start a deployment (one settings file), show its status.")
app.command("reconcile", help="Reconcile accounts with the exchanges: --local in this process, --now via Prefect.")(
    flows_cmd.reconcile
)
app.command("demo", help="The main job on embedded defaults.")(demo_cmd.demo)
app.command(
    "backtest",
    help="Backtest a strategy on recorded bars; write metrics, CSVs and a report.",
    epilog=backtest_cmd.BACKTEST_EPILOG,
)(backtest_cmd.backtest)
app.command("paper", help="Paper-trade a strategy through the live pipeline on a replayed candle file.")(
    paper_cmd.paper
)
app.command("optimize", help="Parameter sweeps and walk-forward analysis.", epilog=optimize_cmd.OPTIMIZE_EPILOG)(
    optimize_cmd.optimize
)
app.command("status", help="Live pipeline: consumer lag, per-agent rates, dead letters, infrastructure.")(
    status_cmd.status
)


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
MELTICA_LOGGERS = ("meltica", "streams", "flows")


def configure_logging() -> str:
    """Log records to stderr: Meltica's own at ``log_level`` of the effective configuration
    (``MELTICA_LOG_LEVEL`` overrides the file), other libraries' at WARNING. When the configuration
    cannot be loaded the command reports that itself; ``MELTICA_LOG_LEVEL`` (else INFO) applies meanwhile.
    Returns the level applied."""
    try:
        level: str = load_settings().log_level
    except MelticaError:
        level = (os.environ.get("MELTICA_LOG_LEVEL") or "INFO").strip().upper()
        if level not in logging.getLevelNamesMapping():
            level = "INFO"
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    # kafka-python's admin client warns whenever its internal poll takes > 100 ms (any loaded machine): a
    # timing note about its own loop, not a problem of the command. Its errors still show.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    for name in MELTICA_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return level


def main() -> None:
    configure_logging()
    # Secrets resolved anywhere in this process are scrubbed from every log record (messages,
    # arguments, tracebacks) before a handler sees them (installed after the handler exists).
    install_log_redaction()
    try:
        app()
    except Exception as exc:  # Typer's own hook would print it unscrubbed (it replaces sys.excepthook)
        print_exception_redacted(type(exc), exc, exc.__traceback__)
        raise SystemExit(1) from None
