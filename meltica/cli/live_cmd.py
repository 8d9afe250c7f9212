"""``meltica live``: run a live deployment (one settings file) — its processes one by one or all together."""

from __future__ import annotations

import typer

from meltica.cli import live_worker_cmd

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)

app.command("worker", help="Run one stream worker of a live deployment (stages from live.workers).")(
    live_worker_cmd.worker
)
app.command("sinks", help="Run the sink worker of a live deployment (database, Kafka, prefix from the file).")(
    live_worker_cmd.sinks
)
