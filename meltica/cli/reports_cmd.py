"""`meltica reports`: serve the stored reports (a backtest's report.html and charts) over HTTP, read-only."""

from __future__ import annotations

import asyncio
import contextlib

import typer

from meltica.cli._common import console, database_engine, reports_errors, schema_at_head
from meltica.config import load_settings
from meltica.errors import InfrastructureUnavailableError
from meltica.reporting.server import DEFAULT_PORT, ReportServer
from meltica.reporting.stored import list_reports, report_url

app = typer.Typer(no_args_is_help=True)


@app.command("serve")
@reports_errors
def serve(
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port (0: any free port)."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on. Anything but loopback needs --allow-remote (the server has no authentication).",
    ),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback --host: anyone who reaches the port reads every report."
    ),
) -> None:
    """Serve the reports stored in the configured database at http://HOST:PORT/reports/<id>/report.html (the
    links Prefect artifacts show; set `reports_url` / MELTICA_REPORTS_URL to the address browsers use);
    read-only; Ctrl-C stops it."""
    engine = database_engine()
    schema_at_head(engine)
    server = ReportServer(engine, host, port, allow_remote=allow_remote)

    async def run() -> None:
        try:
            bound = await server.start()
        except OSError as exc:  # the port is taken, the address is not this machine's
            raise InfrastructureUnavailableError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        console.print(f"serving stored reports at http://{host}:{bound}/", highlight=False)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    engine.dispose()


@app.command("list")
@reports_errors
def list_stored(limit: int = typer.Option(20, "--limit", help="How many, newest first.")) -> None:
    """The stored reports, newest first, with the URL each is served at (`reports_url`)."""
    engine = database_engine()
    schema_at_head(engine)
    base = load_settings().reports_url
    for report in list_reports(engine, limit=limit):
        console.print(
            f"{report.created_at:%Y-%m-%d %H:%M:%S}  {report.kind:<9} {report.title}  "
            f"{report_url(base, report.report_id)}",
            highlight=False,
            soft_wrap=True,
        )
