"""`meltica infra` commands: start, stop and inspect the local infrastructure."""

from __future__ import annotations

import json
import time

import typer

from meltica import infra
from meltica.cli._common import console, err_console
from meltica.errors import MelticaError

app = typer.Typer(no_args_is_help=True)

_out = console
_err = err_console


def _fail(action: str, exc: MelticaError) -> None:
    _err.print(f"[bold red]meltica infra {action} failed:[/] {exc.message}", markup=True, highlight=False)
    raise typer.Exit(code=1)


@app.command("up")
def up_cmd() -> None:
    """Start PostgreSQL and Kafka (reusing running ones) and wait until they answer."""
    t0 = time.monotonic()
    try:
        started = infra.up()
    except MelticaError as exc:
        _fail("up", exc)
        return
    for item in started:
        _out.print(
            f"[green]✓[/] {item.service:<9} {item.kind:<36} {item.address}  ({item.seconds:.1f}s)",
            highlight=False,
            soft_wrap=True,
        )
    _out.print(f"infrastructure up in {time.monotonic() - t0:.1f}s (state in {infra.state_dir()})")


@app.command("down")
def down_cmd() -> None:
    """Stop what `meltica infra up` started (a PostgreSQL cluster that was already running stays up)."""
    try:
        stopped = infra.down()
    except MelticaError as exc:
        _fail("down", exc)
        return
    for service, did in stopped.items():
        _out.print(f"{service:<9} {'stopped' if did else 'nothing to stop (not started by meltica)'}")


@app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show each service, what runs it, where, and whether it answers."""
    try:
        rows = infra.status()
    except MelticaError as exc:
        _fail("status", exc)
        return
    if as_json:
        typer.echo(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    _out.print(infra.status_table(rows))
