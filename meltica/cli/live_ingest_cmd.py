"""`meltica live ingest --config FILE`: the deployment's market-data ingest (``python -m streams.ingest``).

``meltica/`` does not import Faust: the process runs in a child Python, with SIGTERM/SIGINT forwarded
(it stops gracefully). ``--check`` only validates the file and prints what would be subscribed.
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import typer

from meltica.cli._common import console, reports_errors
from meltica.config.loader import check_live, load_settings
from meltica.errors import ConfigurationError


@reports_errors
def ingest(
    config: Path = typer.Option(..., "--config", help="the deployment's settings YAML (live: section)"),
    log_level: str | None = typer.Option(None, "--log-level", help="default: the settings' log_level"),
    check: bool = typer.Option(False, "--check", help="validate and print the subscriptions; start nothing"),
) -> None:
    """Stream trades, closed 1-minute klines and top of book of every instance symbol onto md.* topics;
    refetch gaps in bars by REST; publish market-data staleness on control."""
    from meltica.live.ingest_setup import ingest_accounts, ingest_problems, ingest_subscriptions

    settings = check_live(load_settings(config_file=config), source=str(config))
    problems = ingest_problems(settings)
    if problems:
        raise ConfigurationError(f"{config}: " + "; ".join(problems), field="live.ingest")
    if check:
        accounts = ingest_accounts(settings)
        for sub in ingest_subscriptions(settings):
            account = accounts[sub.exchange]
            venue = account.emulator_url or ("sandbox" if account.sandbox else "live")
            console.print(f"{sub.exchange}:{sub.symbol}  {sub.channel:<10} → {sub.topic}  ({venue})", highlight=False)
        ingest_settings = settings.live.ingest
        console.print(
            f"topics prefix {settings.live.topic_prefix!r}; stale after {ingest_settings.stale_after_s:g}s; "
            f"gaps refetched: {'yes' if ingest_settings.refetch_gaps else 'no'}",
            highlight=False,
        )
        return
    argv = [sys.executable, "-m", "streams.ingest", "--config", str(config)]
    if log_level:
        argv += ["--log-level", log_level]
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)
