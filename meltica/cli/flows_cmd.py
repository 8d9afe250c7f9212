"""`meltica flows` (deploy the Prefect flows, list them, run a local server) and `meltica reconcile`.

Nothing here imports prefect (DESIGN.md §2): deploying runs the venv's ``prefect`` command from the
repository root, and triggering or following a run is plain HTTP against ``PREFECT_API_URL``.
``meltica reconcile --local`` needs no server: it reconciles in this process.
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import typer
from rich.markup import escape

from meltica.cli._common import EXIT_BAD_INPUT, EXIT_FAILURE, console, err_console, reports_errors
from meltica.config import load_settings
from meltica.errors import ConfigurationError
from meltica.infra.postgres import database_url
from meltica.infra.prefect import (
    WORK_POOL,
    ZOMBIE_AUTOMATION,
    FlowRunInfo,
    PrefectApi,
    deploy_flows,
    prefect_api_url,
    require_server_url,
    server_command,
    server_environment,
)
from meltica.secrets import resolve_secret
from meltica.secrets.database import DatabaseCredentialStore
from meltica.storage.engine import make_engine

app = typer.Typer(no_args_is_help=True)

# The deployment `meltica reconcile --now` triggers (prefect.yaml: flow `reconcile`, no schedule).
RECONCILE_FLOW = "reconcile"
RECONCILE_ON_DEMAND = "now"


@app.command("deploy")
@reports_errors
def deploy(
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Configuration file every flow run reads (default: MELTICA_CONFIG, else the MELTICA_ENV file); "
        "a path the worker can read.",
    ),
) -> None:
    """Deploy every flow of prefect.yaml from the checkout you are in (its flows run there), creating the
    `meltica` process work pool if missing; prints each deployment as `flow/deployment`, the name
    `prefect deployment run` takes."""
    result = deploy_flows(config_file=config)
    if result.created_pool:
        console.print(f"work pool {WORK_POOL} (process) created")
    console.print(f"flow runs read {result.config_file or 'the MELTICA_ENV configuration'}", highlight=False)
    if result.created_automation:
        console.print(f"automation created: {ZOMBIE_AUTOMATION}", highlight=False)
    for name in result.deployed:
        console.print(f"[green]✓[/] deployed {name}", highlight=False)
    if result.cancelling_warning:
        console.print(f"[yellow]![/] {escape(result.cancelling_warning)}", highlight=False)
    for name, why in result.paused.items():
        console.print(
            f"[yellow]⏸[/] {name}: schedule paused: {escape(why)}; fix it and deploy again, or resume it in the UI",
            highlight=False,
        )
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
    env = server_environment(os.environ)
    console.print(
        f"Prefect UI: http://127.0.0.1:{port}  —  in other shells: export PREFECT_API_URL=http://127.0.0.1:{port}/api",
        highlight=False,
    )
    argv = server_command(port=port)
    # Replace this process: Ctrl-C, SIGTERM and the exit status are the server's own.
    os.execve(argv[0], argv, env)  # noqa: S606 - the venv's prefect, a fixed argv


def _print_state(info: FlowRunInfo) -> None:
    console.print(f"flow run {info.name} ({info.id}): {info.state_name}", highlight=False)


def _reconcile_local(account: list[str], config: str | None, as_json: bool) -> None:
    from meltica.reconciliation.local import reconcilable_accounts, reconcile_accounts
    from meltica.reconciliation.markdown import markdown

    settings = load_settings(config_file=config)
    names = reconcilable_accounts(settings, account)
    if not names:
        err_console.print("[bold red]error:[/] no account to reconcile (paper accounts have no venue)")
        raise typer.Exit(EXIT_BAD_INPUT)
    if settings.database_url is not None:
        url = resolve_secret(settings.database_url, allow_plaintext=True).get_secret_value()
    else:
        url = database_url()
    engine = make_engine(url)
    try:
        outcomes = asyncio.run(
            reconcile_accounts(engine, settings, names, credential_store=DatabaseCredentialStore(engine))
        )
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps([o.as_dict() for o in outcomes], indent=2))
    else:
        for outcome in outcomes:
            if outcome.report is not None:
                console.print(markdown(outcome.report), highlight=False, markup=False)
    failed = [o for o in outcomes if o.error is not None]
    halted = [o for o in outcomes if o.halted]
    for o in failed:
        err_console.print(f"[bold red]reconciliation failed:[/] {o.account}: {o.error}", highlight=False, markup=True)
    for o in halted:
        assert o.report is not None
        err_console.print(
            f"[bold red]halt needed:[/] {o.account}: kill switch engaged on {', '.join(o.report.halted_scopes)}",
            highlight=False,
        )
    if failed or halted:
        raise typer.Exit(EXIT_FAILURE)
    dirty = sum(len(o.report.discrepancies) for o in outcomes if o.report is not None)
    verdict = "clean" if dirty == 0 else f"{dirty} discrepancies adopted or reported, none needed a halt"
    err_console.print(f"reconciliation of {', '.join(names)}: {verdict}", highlight=False)


@reports_errors
def reconcile(
    now: bool = typer.Option(False, "--now", help="Trigger the reconcile/now deployment."),
    local: bool = typer.Option(
        False, "--local", help="Reconcile in this process (no Prefect server) and print the report."
    ),
    account: list[str] = typer.Option([], "--account", help="Reconcile only this account (repeatable)."),
    config: str | None = typer.Option(
        None, "--config", help="Configuration file (with --now: a path the flow's worker can read)."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --local: the outcomes as JSON on stdout."),
    watch: bool = typer.Option(
        False,
        "--watch",
        help="Wait for the run to finish and print its outcome: why it failed, or what it found per account; "
        "exit 1 when it failed or engaged the kill switch.",
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="With --watch: seconds to wait at most."),
) -> None:
    """Reconcile accounts against the exchanges: every 15 minutes on schedule, now with --now (Prefect), or in
    this process with --local (exit 0: no halt needed; 1: a halt was needed or a run failed)."""
    if now and local:
        raise ConfigurationError("use either --now (a Prefect flow run) or --local (this process), not both")
    if local:
        _reconcile_local(account, config, as_json)
        return
    if not now:
        where = prefect_api_url() or "PREFECT_API_URL (unset)"
        console.print(
            f"reconcile/every-15-minutes runs on the Prefect server at {where}; "
            "use `meltica reconcile --now` to trigger one, or `meltica reconcile --local` to run one here",
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
        why = f": {escape(final.message)}" if final.message and final.is_final else ""
        err_console.print(f"[bold red]error:[/] flow run {final.id} {reason}{why}", highlight=False, markup=True)
        raise typer.Exit(EXIT_FAILURE)
    _print_outcome(api, final.id)


def _print_outcome(api: PrefectApi, flow_run_id: str) -> None:
    """The summary of a completed reconciliation run (its `reconciliation-summary` table artifact); exit 1
    when it engaged the kill switch on any scope, like `--local`."""
    summary = api.flow_run_artifacts(flow_run_id).get("reconciliation-summary")
    rows: list[dict[str, object]] = list(summary["data"]) if summary and isinstance(summary["data"], list) else []
    if not rows:
        err_console.print("[yellow]![/] the run published no reconciliation summary", highlight=False)
        return
    halted = [r for r in rows if r.get("halted")]
    for r in rows:
        line = f"{r['account']}: {r['status']}, {r['discrepancies']} discrepancies ({r['adopted']} adopted)"
        console.print(line + (f", kill switch engaged on {r['halted']}" if r.get("halted") else ""), highlight=False)
    if halted:
        for r in halted:
            err_console.print(
                f"[bold red]halt needed:[/] {r['account']}: kill switch engaged on {r['halted']}", highlight=False
            )
        raise typer.Exit(EXIT_FAILURE)
