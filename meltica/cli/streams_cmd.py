"""`meltica streams` commands: the Kafka topics of the live pipeline (catalogue in meltica.messaging).

Topics are created with kafka-python's admin client (``meltica/`` does not import Faust). The broker is
``--bootstrap``, else ``MELTICA_KAFKA_BOOTSTRAP``, else the local dev broker (``meltica infra``).
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from meltica.cli._common import EXIT_BAD_INPUT, console, err_console, reports_errors

app = typer.Typer(no_args_is_help=True)
topics_app = typer.Typer(no_args_is_help=True)
app.add_typer(topics_app, name="topics", help="Create and list the catalogue's Kafka topics.")

_BOOTSTRAP_HELP = "host:port[,host:port] (default: MELTICA_KAFKA_BOOTSTRAP, else the local dev broker)"
_TIMEOUT_HELP = "seconds to wait for the broker (connection and each request)"
_PREFIX_HELP = "topic name prefix (default: MELTICA_TOPIC_PREFIX, else none)"


@topics_app.command("create")
@reports_errors
def create(
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    prefix: str | None = typer.Option(None, "--prefix", help=_PREFIX_HELP),
    replication: int = typer.Option(1, "--replication", min=1, help="replication factor of new topics"),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
) -> None:
    """Create every catalogue topic that does not exist yet (idempotent)."""
    from meltica.messaging.admin import create_topics, default_bootstrap
    from meltica.messaging.catalogue import Catalogue

    catalogue = Catalogue(prefix=prefix)
    result = create_topics(
        bootstrap or default_bootstrap(), catalogue, replication=replication, timeout_ms=int(timeout * 1000)
    )
    for name in result.created:
        console.print(f"created  {name}", highlight=False)
    for name in result.existing:
        console.print(f"exists   {name}", highlight=False)
    console.print(f"{len(result.created)} created, {len(result.existing)} already existed", highlight=False)


@topics_app.command("list")
@reports_errors
def list_(
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    prefix: str | None = typer.Option(None, "--prefix", help=_PREFIX_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
) -> None:
    """The catalogue with what the broker has: partitions, configs, drift, missing topics."""
    from meltica.messaging.admin import default_bootstrap, describe_topics, spec_matches
    from meltica.messaging.catalogue import Catalogue

    catalogue = Catalogue(prefix=prefix)
    info = describe_topics(bootstrap or default_bootstrap(), catalogue.physical_names(), timeout_ms=int(timeout * 1000))
    rows: list[dict[str, Any]] = []
    for spec in catalogue:
        name = catalogue.topic_name(spec.name)
        have = info.get(name)
        rows.append(
            {
                "topic": name,
                "key": spec.key,
                "schema": spec.schema_name,
                "partitions": spec.partitions,
                "configs": spec.topic_configs(),
                "exists": have is not None,
                "broker_partitions": None if have is None else have.partitions,
                "drift": [] if have is None else spec_matches(spec, have),
            }
        )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for row in rows:
        state = "missing" if not row["exists"] else ("ok" if not row["drift"] else "DRIFT " + "; ".join(row["drift"]))
        console.print(
            f"{row['topic']:<32} {row['schema']:<20} key={row['key']:<34} partitions={row['partitions']}  {state}",
            highlight=False,
            soft_wrap=True,
        )


@app.command("worker")
def worker(
    config: str = typer.Option(..., "--config", help="worker config file (YAML/JSON, see streams/worker.py)"),
    app_id: str | None = typer.Option(None, "--app-id", help="Faust app id = consumer group (overrides the config)"),
    factory: str | None = typer.Option(None, "--factory", help="processor factory module:function"),
    log_level: str = typer.Option("INFO", "--log-level", help="log level of the worker"),
) -> None:
    """Run a Faust worker (``python -m streams.worker``) in a subprocess; SIGTERM/SIGINT stop it gracefully.

    One process can host every agent; several processes with the same --app-id split the partitions."""
    if not Path(config).is_file():
        err_console.print(
            f"[bold red]error:[/] worker config file {config!r} not found (an example: infra/examples/worker.yaml)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    argv = [sys.executable, "-m", "streams.worker", "--config", config, "--log-level", log_level]
    if app_id:
        argv += ["--app-id", app_id]
    if factory:
        argv += ["--factory", factory]
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)
