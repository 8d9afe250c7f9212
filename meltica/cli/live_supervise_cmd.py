"""`meltica live start` and `meltica live status`: run a live deployment (one settings file) on one machine,
and show how it stands. The supervisor is :mod:`meltica.live.supervisor`; the figures come from
:mod:`meltica.live.live_status` (database) and the worker stats topic (as `meltica status`).
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from meltica.cli._common import console, err_console, reports_errors
from meltica.config.loader import check_live, load_settings
from meltica.infra.kafka import kafka_status
from meltica.live.live_status import deployment_status, market_status_messages
from meltica.storage.engine import make_engine

_CONFIG_HELP = "the deployment's settings file (YAML): accounts, risk limits, the live section"


def _say(line: str) -> None:
    err_console.print(line, highlight=False, soft_wrap=True, markup=False)


@reports_errors
def start(
    config: Path = typer.Option(..., "--config", help=_CONFIG_HELP),
    cancel_all_on_stop: bool | None = typer.Option(
        None,
        "--cancel-all-on-stop/--no-cancel-all-on-stop",
        help="on stop, cancel every open order of the traded accounts first (default: live.cancel_all_on_stop)",
    ),
    stop_deadline: float = typer.Option(30.0, "--stop-deadline", min=0.1, help="seconds the children get to stop"),
    cancel_deadline: float = typer.Option(
        30.0, "--cancel-deadline", min=0.1, help="seconds to wait for the cancels to show in the database"
    ),
) -> None:
    """Start and supervise the deployment's ingest, workers and sinks in the foreground; Ctrl-C or SIGTERM
    stops them all. Refuses (exit 2) a configuration `check_live` rejects; migrates the database and
    creates the topics first. Exits 1 when a process crash-loops or the cancel-all left orders open."""
    from meltica.live.supervisor import (
        CancelAllOnStop,
        RestartPolicy,
        Supervisor,
        SupervisorError,
        child_environment,
        database_url_of,
        deployment_children,
        kafka_bootstrap,
        prepare_deployment,
        state_dir_of,
        supervisor_running,
    )

    settings = check_live(load_settings(config_file=config), str(config))
    state_dir = state_dir_of(settings)
    if supervisor_running(state_dir):  # refused again by the lock; said before touching database and broker
        raise SupervisorError(f"a supervisor already runs this deployment ({state_dir}); stop it first")
    engine = make_engine(database_url_of(settings))
    bootstrap = kafka_bootstrap(settings)
    prepare_deployment(settings, source=str(config), engine=engine, bootstrap=bootstrap, say=_say)
    cancel = settings.live.cancel_all_on_stop if cancel_all_on_stop is None else cancel_all_on_stop
    before_stop = CancelAllOnStop(settings, engine, bootstrap, deadline_s=cancel_deadline, say=_say) if cancel else None
    supervisor = Supervisor(
        deployment_children(settings, config),
        state_dir=state_dir,
        policy=RestartPolicy(stop_deadline_s=stop_deadline),
        before_stop=before_stop,
        say=_say,
        config_file=str(config.resolve()),
        env=child_environment(settings, config),
    )
    _say(f"state and logs in {state_dir}; cancel all on stop: {'yes' if cancel else 'no'}")
    code = supervisor.run()
    raise typer.Exit(code)


def _broker(settings: Any) -> str | None:
    """The deployment's broker, without starting one: settings, else MELTICA_KAFKA_BOOTSTRAP, else the dev
    broker when it runs; ``None`` when there is none."""
    from meltica.messaging.admin import BOOTSTRAP_ENV

    if settings.kafka.bootstrap_servers:
        return str(settings.kafka.bootstrap_servers)
    if os.environ.get(BOOTSTRAP_ENV):
        return os.environ[BOOTSTRAP_ENV]

    status = kafka_status()
    return status.address if status.pid is not None else None


def collect(config: Path, *, timeout: float = 5.0) -> dict[str, Any]:
    """Everything `meltica live status --json` prints."""
    from meltica.cli.status_cmd import collect_status
    from meltica.live.supervisor import database_url_of, state_dir_of, supervised_view
    from meltica.messaging.catalogue import Catalogue

    settings = load_settings(config_file=config)
    engine = make_engine(database_url_of(settings))
    try:
        report = deployment_status(settings, engine, now=datetime.now(UTC))
    finally:
        engine.dispose()
    report["config"] = str(config)
    report["supervisor"] = supervised_view(state_dir_of(settings))
    prefix = settings.live.topic_prefix
    bootstrap = _broker(settings)
    if bootstrap is None:
        report["workers"] = {"error": "no Kafka broker configured or running"}
        report["market_status"] = []
        return report
    try:
        workers = collect_status(bootstrap, prefix, timeout_ms=int(timeout * 1000))
        report["workers"] = {"stats_topic": workers["stats_topic"], "groups": workers["groups"]}
    except Exception as exc:  # a read-only view: the database part stands without the broker
        report["workers"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        statuses = market_status_messages(bootstrap, Catalogue(prefix=prefix).topic_name("control"), timeout_s=timeout)
    except Exception as exc:
        report["market_status"] = {"error": f"{type(exc).__name__}: {exc}"}
        return report
    report["market_status"] = statuses
    by_market = {(str(m.get("exchange")), str(m.get("symbol"))): m for m in statuses}
    for market in report["market_data"]:
        market["status"] = by_market.get((market["exchange"], market["symbol"]))
    return report


@reports_errors
def status(
    config: Path = typer.Option(..., "--config", help=_CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="seconds to wait for the broker"),
) -> None:
    """Per account: open orders, positions at their mark with unrealized PnL, realized PnL per strategy, risk
    utilisation, kill switch; last market data per stream; worker health; which supervised processes run."""
    report = collect(config, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    _print(report)


def _print(report: dict[str, Any]) -> None:
    def out(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True, markup=False)

    sup = report["supervisor"]
    out(f"deployment {report['config']} ({report['environment']}, topics {report['topic_prefix']}*)")
    out(f"supervisor: {sup['state']}" + (f", pid {sup['pid']}" if sup.get("pid") else ""))
    if sup.get("failure"):
        out(f"  failure: {sup['failure'].splitlines()[0]}")
    for child in sup["children"]:
        how = f"pid {child['pid']}" if child["running"] else f"not running ({child.get('last_exit_text') or '-'})"
        out(f"  {child['name']:<20} {how}, restarts {child['restarts']}, log {child['log']}")
    global_switch = report["kill_switch"].get("global", {"mode": "off"})
    out(f"kill switch global: {global_switch['mode']}")
    for account in report["accounts"]:
        risk, pnl = account["risk"], account["pnl"]
        out(f"\naccount {account['account']} ({account['exchange']}): instances {', '.join(account['instances'])}")
        for scope, state in account["kill_switch"]["scopes"].items():
            if scope != "global":
                out(f"  kill switch {scope}: {state['mode']} ({state['reason'] or ''})")
        out(f"  PnL realized {pnl['realized']} unrealized {pnl['unrealized']} fees {pnl['fees']} total {pnl['total']}")
        for strategy in account["strategies"]:
            out(
                f"    {strategy['strategy']}: realized {strategy['realized_pnl']} unrealized "
                f"{strategy['unrealized_pnl']} fees {strategy['fees']}"
            )
        for fill in account["unbooked_fills"]:
            out(f"  UNBOOKED fill {fill['trade_id']}: {fill['reason']}")
        for name in ("gross_exposure", "net_exposure", "open_orders"):
            view = risk[name]
            out(f"  {name.replace('_', ' ')}: {view['used']} of {view['limit'] or 'no limit'} ({view['utilisation']})")
        for position in account["positions"]:
            out(
                f"  position {position['exchange']} {position['symbol']}: {position['quantity']} "
                f"@ {position['avg_entry_price']} mark {position['mark_price']} ({position['mark_source']}) "
                f"unrealized {position['unrealized_pnl']} (snapshot {position['snapshot_quantity']})"
            )
        out(f"  open order list ({len(account['open_orders'])}):")
        for order in account["open_orders"]:
            out(
                f"    {order['symbol']} {order['side']} {order['quantity']} @ {order['price']} {order['status']} "
                f"filled {order['filled_quantity']} ({order['client_order_id']})"
            )
    out("\nmarket data:")
    for market in report["market_data"]:
        out(
            f"  {market['exchange']} {market['symbol']}: candle {market['last_candle_ts']} trade "
            f"{market['last_trade_ts']} age {'-' if market['age_s'] is None else str(market['age_s']) + 's'}"
            f"{' STALE' if market['stale'] else ''}"
        )
    statuses = report.get("market_status")
    if isinstance(statuses, list):
        for item in statuses:
            out(f"  status {item.get('exchange')} {item.get('symbol')}: {json.dumps(item, default=str)}")
    workers = report["workers"]
    if "error" in workers:
        out(f"\nworkers: unknown ({workers['error']})")
        return
    out(f"\nworkers ({workers['stats_topic']}):" if workers["groups"] else "\nworkers: none has published stats")
    for group in workers["groups"]:
        out(f"  {group['group']} state={group['state']} members={group['members']} lag={group['lag']}")
        for worker in group["workers"]:
            out(f"    {worker['worker_id']} {worker['state']} ({worker['age_s']}s ago)")
