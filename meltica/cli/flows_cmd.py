"""`meltica flows` (deploy the Prefect flows, list them, run a local server) and `meltica reconcile --now`.

Nothing here imports prefect (DESIGN.md §2): deploying runs the venv's ``prefect`` command from the
repository root, and triggering or following a run is plain HTTP against ``PREFECT_API_URL``.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from meltica.cli._common import EXIT_FAILURE, console, err_console, reports_errors
from meltica.infra.prefect import (
    WORK_POOL,
    FlowRunInfo,
    PrefectApi,
    deploy_flows,
    prefect_api_url,
    require_server_url,
    server_command,
)

app = typer.Typer(no_args_is_help=True)

# The deployment `meltica reconcile --now` triggers (prefect.yaml: flow `reconcile`, no schedule).
RECONCILE_FLOW = "reconcile"
RECONCILE_ON_DEMAND = "on-demand"


@app.command("deploy")
@reports_errors
def deploy() -> None:
    """Create the `meltica` process work pool (if missing) and deploy every flow of prefect.yaml."""
    result = deploy_flows()
    if result.created_pool:
        console.print(f"work pool {WORK_POOL} (process) created")
    for name in result.deployed:
        console.print(f"[green]✓[/] deployed {name}", highlight=False)
    for name in result.skipped:
        console.print(f"[yellow]![/] skipped {name}: its flow file is not in this checkout", highlight=False)
    console.print(f"start a worker: prefect worker start --pool {WORK_POOL}", highlight=False)


@app.command("list")
@reports_errors
def list_deployments() -> None:
    """The deployments on the Prefect server (`flow/deployment`)."""
    for name in PrefectApi(require_server_url()).deployment_names():
        console.print(name, highlight=False)


@app.command("server")
def server(
    port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1 for the API and the UI."),
) -> None:
    """Run a Prefect server (API + UI) on loopback in the foreground; Ctrl-C stops it."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    console.print(
        f"Prefect UI: http://127.0.0.1:{port}  —  in other shells: export PREFECT_API_URL=http://127.0.0.1:{port}/api",
        highlight=False,
    )
    argv = server_command(port=port)
    # Replace this process: Ctrl-C, SIGTERM and the exit status are the server's own.
    os.execve(argv[0], argv, env)  # noqa: S606 - the venv's prefect, a fixed argv


def _print_state(info: FlowRunInfo) -> None:
    console.print(f"flow run {info.name} ({info.id}): {info.state_name}", highlight=False)


@reports_errors
def reconcile(
    now: bool = typer.Option(False, "--now", help="Trigger the reconcile/on-demand deployment now."),
    account: list[str] = typer.Option([], "--account", help="Reconcile only this account (repeatable)."),
    config: str | None = typer.Option(
        None, "--config", help="Configuration file the flow run loads (a path the worker can read)."
    ),
    watch: bool = typer.Option(False, "--watch", help="Wait for the run to finish; exit 1 unless it completed."),
    timeout: float = typer.Option(600.0, "--timeout", help="With --watch: seconds to wait at most."),
) -> None:
    """Reconcile accounts against the exchanges: runs every 15 minutes on schedule, or now with --now."""
    if not now:
        where = prefect_api_url() or "PREFECT_API_URL (unset)"
        console.print(
            f"reconcile/scheduled runs every 15 minutes on the Prefect server at {where}; "
            "use `meltica reconcile --now` to trigger one",
            highlight=False,
        )
        return
    api = PrefectApi(require_server_url())
    parameters: dict[str, object] = {"trigger": "cli"}
    if account:
        parameters["accounts"] = list(account)
    if config:
        parameters["config_file"] = str(Path(config).expanduser().resolve())
    run = api.create_flow_run(RECONCILE_FLOW, RECONCILE_ON_DEMAND, parameters)
    console.print(f"triggered {run.deployment}: flow run {run.name} ({run.id})", highlight=False)
    if not watch:
        console.print(f"follow it in the UI or: prefect flow-run inspect {run.id}", highlight=False)
        return
    final = api.wait_for_flow_run(run.id, timeout=timeout, on_change=_print_state)
    if final.state_type != "COMPLETED":
        reason = "still " + final.state_name if not final.is_final else final.state_name
        err_console.print(f"[bold red]error:[/] flow run {final.id} {reason}", highlight=False)
        raise typer.Exit(EXIT_FAILURE)
