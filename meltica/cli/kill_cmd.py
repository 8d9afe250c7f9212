"""`meltica kill` commands: engage, release and show the kill switch (state in the database).

``on`` and ``off`` change the database first (the durable truth: a process that starts later reads it;
``KillSwitch.refresh()`` picks it up), then publish a ``KillSwitchCommand`` on the live pipeline's
``control`` topic (``MELTICA_TOPIC_PREFIX`` applies) so the running risk gate blocks, strategies stop and
the execution agent cancels at once. The broker: ``--bootstrap``, else ``MELTICA_KAFKA_BOOTSTRAP``, else
the local dev broker when ``meltica infra`` runs one. A broker that is configured but cannot take the
command makes the command fail (exit 1) after the database change, saying that the live pipeline was
not notified. No broker configured, or no control topic on it (no live pipeline was ever set up there):
nothing to notify, said on stderr, exit 0.
"""

from __future__ import annotations

import os
import uuid
import warnings
from datetime import UTC, datetime
from typing import Literal

import typer

from meltica.cli._common import EXIT_BAD_INPUT, EXIT_FAILURE, console, database_engine, err_console, reports_errors
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, default_actor
from meltica.risk.kill_switch import validate_scope

app = typer.Typer(no_args_is_help=True)

_SCOPE_HELP = "global, account:<name> or strategy:<name>"
_BOOTSTRAP_HELP = "Kafka host:port of the live pipeline (default: MELTICA_KAFKA_BOOTSTRAP, else the dev broker)"
_TIMEOUT_HELP = "seconds to wait for the broker"


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
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
) -> None:
    """Engage the kill switch (database, then the live pipeline's control topic)."""
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
    engaged: Literal["halt", "reduce_only"] = "halt" if target is KillSwitchMode.HALT else "reduce_only"
    _notify_pipeline(where, engaged, reason, actor or default_actor(), bootstrap, timeout)


@app.command("off")
@reports_errors
def off(
    reason: str = typer.Option(..., "--reason", help="Why: stored with the change."),
    scope: str = typer.Option("global", "--scope", help=_SCOPE_HELP),
    actor: str | None = typer.Option(None, "--actor", help="Who (default: the OS user)."),
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
) -> None:
    """Release the kill switch (an explicit, recorded action; database, then the control topic)."""
    where = _scope(scope)
    switch = _switch()
    before = switch.state_of(where).mode
    state = switch.release(actor or default_actor(), reason, scope=where)
    if before is KillSwitchMode.OFF:
        console.print(f"kill switch {where}: already off")
    else:
        console.print(f"kill switch {where}: {before.value} → off by {state.actor}: {state.reason}")
    _notify_pipeline(where, "off", reason, actor or default_actor(), bootstrap, timeout)


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


# --- the live pipeline ---------------------------------------------------------------------------


def _broker(option: str | None) -> tuple[str | None, str]:
    """The bootstrap servers to notify and where they came from; ``None``: no broker configured."""
    from meltica.messaging.admin import BOOTSTRAP_ENV

    if option:
        return option, "--bootstrap"
    configured = os.environ.get(BOOTSTRAP_ENV)
    if configured:
        return configured, BOOTSTRAP_ENV
    from meltica.infra.kafka import kafka_status

    status = kafka_status()  # does not start anything
    if status.pid is None:
        return None, f"no Kafka broker configured ({BOOTSTRAP_ENV}) or started by `meltica infra up`"
    return status.address, "the local dev broker"


def _notify_pipeline(
    scope: str,
    mode: Literal["off", "halt", "reduce_only"],
    reason: str,
    actor: str,
    bootstrap_option: str | None,
    timeout: float,
) -> None:
    """Publish the change as a ``KillSwitchCommand`` on ``control``; exit 1 when a configured broker
    cannot take it (the database change stands)."""
    from meltica.messaging.catalogue import Catalogue
    from meltica.messaging.codec import Codec
    from meltica.messaging.schemas import KillSwitchCommand

    bootstrap, source = _broker(bootstrap_option)
    catalogue = Catalogue()
    topic = catalogue.topic_name("control")
    if bootstrap is None:
        err_console.print(f"[yellow]live pipeline not notified:[/] {source}", highlight=False)
        return
    command = KillSwitchCommand(
        command_id=f"kill-{uuid.uuid4().hex}",
        actor=actor[:128],
        ts=datetime.now(UTC),
        scope=scope,
        mode=mode,
        reason=reason[:1000],
    )
    try:
        where = _publish(bootstrap, topic, scope, Codec(catalogue).encode("control", command), timeout)
    except Exception as exc:
        err_console.print(
            f"[bold red]error:[/] the database is changed, but the live pipeline was NOT notified: "
            f"cannot publish to {topic} on {bootstrap} ({source}): {type(exc).__name__}: {exc}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILURE) from None
    if where is None:
        err_console.print(
            f"[yellow]live pipeline not notified:[/] no topic {topic} on {bootstrap} ({source}): no live pipeline "
            "was set up there (`meltica streams topics create`)",
            highlight=False,
        )
        return
    console.print(f"live pipeline notified: command {command.command_id} on {topic} {where}", highlight=False)


def _publish(bootstrap: str, topic: str, key: str, value: bytes, timeout: float) -> str | None:
    """Send one record and wait for the broker's acknowledgement; ``None`` when ``topic`` does not exist
    (it is never auto-created here). Raises when the broker cannot be reached or refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3 read_text on import
        from kafka import KafkaAdminClient, KafkaProducer

    timeout_ms = int(timeout * 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="meltica-kill",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )
    try:
        if topic not in set(admin.list_topics()):
            return None
    finally:
        admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="meltica-kill",
        acks="all",
        allow_auto_create_topics=False,
        max_block_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )
    try:
        sent = producer.send(topic, key=key.encode(), value=value).get(timeout=timeout)
    finally:
        producer.close(timeout=timeout)
    return f"(partition {sent.partition}, offset {sent.offset})"
