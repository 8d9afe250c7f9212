"""`meltica kill` commands: engage, release and show the kill switch (state in the database).

A running risk worker learns of a change through ``KillSwitch.refresh()`` (polled, or on a control
message); the OMS, subscribed to the kill switch, then cancels the open orders of a halted scope.
"""

from __future__ import annotations

import typer

from meltica.cli._common import EXIT_BAD_INPUT, console, database_engine, err_console, reports_errors
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, default_actor
from meltica.risk.kill_switch import validate_scope

app = typer.Typer(no_args_is_help=True)

_SCOPE_HELP = "global, account:<name> or strategy:<name>"


def _switch() -> KillSwitch:
    return KillSwitch(KillSwitchStore(database_engine()))


def _scope(value: str) -> str:
    try:
        return validate_scope(value)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command("on")
@reports_errors
def on(
    reason: str = typer.Option(..., "--reason", help="Why: stored with the change."),
    mode: str = typer.Option("halt", "--mode", help="halt (cancel open orders, block new ones) or reduce-only."),
    scope: str = typer.Option("global", "--scope", help=_SCOPE_HELP),
    actor: str | None = typer.Option(None, "--actor", help="Who (default: the OS user)."),
) -> None:
    """Engage the kill switch."""
    try:
        target = KillSwitchMode.parse(mode)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if target is KillSwitchMode.OFF:
        err_console.print("[bold red]error:[/] use `meltica kill off` to release the kill switch", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    where = _scope(scope)
    switch = _switch()
    before = switch.state_of(where).mode
    state = switch.engage(target, reason, actor or default_actor(), scope=where)
    if before is state.mode:
        console.print(f"kill switch {where}: already {state.mode.value} (since {state.since.isoformat()})")
    else:
        console.print(f"kill switch {where}: {before.value} → {state.mode.value} by {state.actor}: {state.reason}")


@app.command("off")
@reports_errors
def off(
    reason: str = typer.Option(..., "--reason", help="Why: stored with the change."),
    scope: str = typer.Option("global", "--scope", help=_SCOPE_HELP),
    actor: str | None = typer.Option(None, "--actor", help="Who (default: the OS user)."),
) -> None:
    """Release the kill switch (an explicit, recorded action)."""
    where = _scope(scope)
    switch = _switch()
    before = switch.state_of(where).mode
    state = switch.release(actor or default_actor(), reason, scope=where)
    if before is KillSwitchMode.OFF:
        console.print(f"kill switch {where}: already off")
    else:
        console.print(f"kill switch {where}: {before.value} → off by {state.actor}: {state.reason}")


@app.command("status")
@reports_errors
def status() -> None:
    """Show the kill switch of every scope that has been set."""
    states = _switch().states()
    if not states:
        console.print("kill switch global: off (never engaged)")
        return
    for scope in sorted(states, key=lambda s: (s != "global", s)):
        state = states[scope]
        console.print(
            f"kill switch {scope}: {state.mode.value} since {state.since.isoformat()} "
            f"by {state.actor or '?'}: {state.reason or ''}",
            highlight=False,
        )
