"""`meltica live …`: one live deployment = one settings file. Each area registers its command here."""

from __future__ import annotations

import typer

from meltica.cli import live_ingest_cmd

app = typer.Typer(no_args_is_help=True)
app.command("ingest", help="Market data from the venues onto the md.* topics (python -m streams.ingest).")(
    live_ingest_cmd.ingest
)
