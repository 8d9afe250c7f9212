"""`meltica live`: one live deployment, one settings file (`--config FILE`). Each area adds its commands
from its own module (`live_<area>_cmd.py`), one registration line each."""

from __future__ import annotations

import typer

from meltica.cli import live_supervise_cmd

app = typer.Typer(no_args_is_help=True)

app.command("start", help="Start and supervise ingest, workers and sinks of a deployment (foreground).")(
    live_supervise_cmd.start
)
app.command("status", help="Per account: orders, positions, PnL, risk, kill switch; market data; processes.")(
    live_supervise_cmd.status
)
