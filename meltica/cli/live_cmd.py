"""`meltica live`: one live deployment, one settings file (`--config FILE`). Each area adds its commands
from its own module (`live_<area>_cmd.py`), one registration line each."""

from __future__ import annotations

import typer

from meltica.cli import live_ingest_cmd, live_supervise_cmd, live_worker_cmd

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)

app.command("start", help="Start and supervise ingest, workers and sinks of a deployment (foreground).")(
    live_supervise_cmd.start
)
app.command("status", help="Per account: orders, positions, PnL, risk, kill switch; market data; processes.")(
    live_supervise_cmd.status
)
app.command("ingest", help="Market data from the venues onto the md.* topics (python -m streams.ingest).")(
    live_ingest_cmd.ingest
)
app.command("worker", help="Run one stream worker of a live deployment (stages from live.workers).")(
    live_worker_cmd.worker
)
app.command("sinks", help="Run the sink worker of a live deployment (database, Kafka, prefix from the file).")(
    live_worker_cmd.sinks
)
