"""`meltica kill` commands: engage, release and show the kill switch (state in the database).

``on`` and ``off`` change the database first (the durable truth: a process that starts later reads it;
``KillSwitch.refresh()`` picks it up), then publish a ``KillSwitchCommand`` on the live pipeline's
``control`` topic (``MELTICA_TOPIC_PREFIX`` applies) so the running risk gate blocks, strategies stop and
the execution agent cancels at once. The broker: ``--bootstrap``, else ``MELTICA_KAFKA_BOOTSTRAP``, else
the local dev broker when ``meltica infra`` runs one. A broker that is configured but cannot take the
command makes the command fail (exit 1) after the database change, saying that the live pipeline was
not notified. No broker configured, or no control topic on it (no live pipeline was ever set up there):
nothing to notify, said on stderr, exit 0.

``--config FILE`` names a live deployment's settings file (``meltica live start --config FILE``): its
database, its Kafka (``kafka.bootstrap_servers``, also ``MELTICA_KAFKA__BOOTSTRAP_SERVERS``) and its topic
prefix (``live.topic_prefix``) are used, a scope naming an account or strategy instance the file does not
configure is refused, and a pipeline that could not be told is a failure (exit 1). Fail closed: when the
database cannot be written, ``on`` still publishes the command to the live pipeline, then exits 1 saying
the database was not updated (a worker started later would not see the halt).
"""

# lazy imports: a command loads backtest/live/messaging/kafka/numpy when it runs, so `meltica --help` starts fast

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from meltica.cli._common import EXIT_BAD_INPUT, EXIT_FAILURE, console, database_engine, err_console, reports_errors
from meltica.config import load_settings
from meltica.config.settings import MelticaSettings
from meltica.errors import InfrastructureUnavailableError
from meltica.infra.kafka import kafka_status
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore, default_actor
from meltica.risk.kill_switch import CHANGE_LOG_FORMAT, validate_scope
from meltica.secrets import resolve_secret
from meltica.storage.engine import make_engine

SETTINGS_BOOTSTRAP_ENV = "MELTICA_KAFKA__BOOTSTRAP_SERVERS"

app = typer.Typer(no_args_is_help=True)

_SCOPE_HELP = "global, account:<name> or strategy:<name>"
_BOOTSTRAP_HELP = "Kafka host:port of the live pipeline (default: MELTICA_KAFKA_BOOTSTRAP, else the dev broker)"
_TIMEOUT_HELP = "seconds to wait for the broker"


_CONFIG_HELP = "a live deployment's settings file: its database, Kafka, topic prefix and accounts"


@dataclass(frozen=True)
class _Target:
    """Where a kill-switch change goes: the database engine factory, the broker, the topic prefix."""

    settings: MelticaSettings | None
    bootstrap: str | None
    prefix: str | None

    def engine(self) -> Engine:
        if self.settings is not None and self.settings.database_url is not None:
            return make_engine(resolve_secret(self.settings.database_url, allow_plaintext=True).get_secret_value())
        return database_engine()


def _target(config: Path | None, bootstrap: str | None) -> _Target:
    if config is None:
        return _Target(None, bootstrap, None)

    settings = load_settings(config_file=config)
    return _Target(settings, bootstrap or settings.kafka.bootstrap_servers, settings.live.topic_prefix)


def _switch(target: _Target) -> KillSwitch:
    return KillSwitch(KillSwitchStore(target.engine()))


def _scope(value: str, settings: MelticaSettings | None = None) -> str:
    try:
        scope = validate_scope(value)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if settings is None:
        return scope
    kind, _, name = scope.partition(":")
    known = {
        "account": {a.name for a in settings.accounts},
        "strategy": {i.instance_id for i in settings.live.instances} | {i.strategy for i in settings.live.instances},
    }.get(kind)
    if known is not None and name not in known:
        err_console.print(
            f"[bold red]error:[/] scope {scope}: the configuration has no {kind} named {name!r} "
            f"(known: {', '.join(sorted(known)) or 'none'})",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    return scope


@app.command("on")
@reports_errors
def on(
    reason: str = typer.Option(..., "--reason", help="Why: stored with the change."),
    mode: str = typer.Option("halt", "--mode", help="halt (cancel open orders, block new ones) or reduce-only."),
    scope: str = typer.Option("global", "--scope", help=_SCOPE_HELP),
    actor: str | None = typer.Option(None, "--actor", help="Who (default: the OS user)."),
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Engage the kill switch (database, then the live pipeline's control topic)."""
    try:
        target_mode = KillSwitchMode.parse(mode)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if target_mode is KillSwitchMode.OFF:
        err_console.print("[bold red]error:[/] use `meltica kill off` to release the kill switch", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    target = _target(config, bootstrap)
    where = _scope(scope, target.settings)
    who = actor or default_actor()
    engaged: Literal["halt", "reduce_only"] = "halt" if target_mode is KillSwitchMode.HALT else "reduce_only"
    try:
        switch = _switch(target)
        before = switch.state_of(where).mode
        with _printed_here():
            state = switch.engage(target_mode, reason, who, scope=where)
    except (OperationalError, InfrastructureUnavailableError) as exc:
        # Fail closed: the running pipeline must halt even when the database cannot record it.
        told = _notify_pipeline(where, engaged, reason, who, target, timeout, required=True)
        err_console.print(
            f"[bold red]error:[/] the database was NOT updated ({_db_reason(exc)}); "
            + ("the live pipeline was told to " + engaged if told else "the live pipeline was NOT told either")
            + ". A worker started later will not see this kill switch: run the command again once the "
            "database is back.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILURE) from None
    if before is state.mode:
        console.print(f"kill switch {where}: already {state.mode.value} (since {state.since.isoformat()})")
    else:
        console.print(f"kill switch {where}: {before.value} → {state.mode.value} by {state.actor}: {state.reason}")
    if not _notify_pipeline(where, engaged, reason, who, target, timeout, required=target.settings is not None):
        raise typer.Exit(EXIT_FAILURE)


class _ChangePrintedHere(logging.Filter):
    """Drops the kill switch's own log line of a change: the command prints that change on stdout already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != CHANGE_LOG_FORMAT


@contextmanager
def _printed_here() -> Iterator[None]:
    # Only the change line: a failure to store it (logged at error level) still reaches stderr.
    logger = logging.getLogger("meltica.risk.kill_switch")
    quiet = _ChangePrintedHere()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@app.command("off")
@reports_errors
def off(
    reason: str = typer.Option(..., "--reason", help="Why: stored with the change."),
    scope: str = typer.Option("global", "--scope", help=_SCOPE_HELP),
    actor: str | None = typer.Option(None, "--actor", help="Who (default: the OS user)."),
    bootstrap: str | None = typer.Option(None, "--bootstrap", help=_BOOTSTRAP_HELP),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help=_TIMEOUT_HELP),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Release the kill switch (an explicit, recorded action; database, then the control topic). The
    database must take the change first: a release that cannot be recorded is not published."""
    target = _target(config, bootstrap)
    where = _scope(scope, target.settings)
    switch = _switch(target)
    before = switch.state_of(where).mode
    with _printed_here():
        state = switch.release(actor or default_actor(), reason, scope=where)
    if before is KillSwitchMode.OFF:
        console.print(f"kill switch {where}: already off")
    else:
        console.print(f"kill switch {where}: {before.value} → off by {state.actor}: {state.reason}")
    if not _notify_pipeline(
        where, "off", reason, actor or default_actor(), target, timeout, required=target.settings is not None
    ):
        raise typer.Exit(EXIT_FAILURE)


@app.command("status")
@reports_errors
def status(config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP)) -> None:
    """Show the kill switch of every scope that has been set."""
    states = _switch(_target(config, None)).states()
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


def _db_reason(exc: Exception) -> str:
    if isinstance(exc, OperationalError) and exc.orig is not None:
        return str(exc.orig).strip().splitlines()[0]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --- the live pipeline ---------------------------------------------------------------------------


def _broker(option: str | None) -> tuple[str | None, str]:
    """The bootstrap servers to notify and where they came from; ``None``: no broker configured."""
    from meltica.messaging.admin import BOOTSTRAP_ENV

    if option:
        return option, "--bootstrap or the configuration"
    configured = os.environ.get(BOOTSTRAP_ENV)
    if configured:
        return configured, BOOTSTRAP_ENV
    # The settings' spelling (MELTICA_KAFKA__BOOTSTRAP_SERVERS, or kafka.bootstrap_servers in the file).
    settings_value = os.environ.get(SETTINGS_BOOTSTRAP_ENV)
    if settings_value:
        return settings_value, SETTINGS_BOOTSTRAP_ENV

    status = kafka_status()  # does not start anything
    if status.pid is None:
        return None, f"no Kafka broker configured ({BOOTSTRAP_ENV}) or started by `meltica infra up`"
    return status.address, "the local dev broker"


def _notify_pipeline(
    scope: str,
    mode: Literal["off", "halt", "reduce_only"],
    reason: str,
    actor: str,
    target: _Target,
    timeout: float,
    *,
    required: bool,
) -> bool:
    """Publish the change as a ``KillSwitchCommand`` on ``control``. False when the pipeline was not told
    and had to be (``required``: a deployment is configured) or a configured broker could not take it."""
    from meltica.messaging.catalogue import Catalogue
    from meltica.messaging.codec import Codec
    from meltica.messaging.schemas import KillSwitchCommand

    bootstrap, source = _broker(target.bootstrap)
    catalogue = Catalogue(prefix=target.prefix)
    topic = catalogue.topic_name("control")
    if bootstrap is None:
        err_console.print(
            f"[{'bold red' if required else 'yellow'}]live pipeline not notified:[/] {source}", highlight=False
        )
        return not required
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
            "[bold red]error:[/] the live pipeline was NOT notified: "
            f"cannot publish to {topic} on {bootstrap} ({source}): {type(exc).__name__}: {exc}",
            highlight=False,
            soft_wrap=True,
        )
        return False
    if where is None:
        err_console.print(
            f"[{'bold red' if required else 'yellow'}]live pipeline not notified:[/] no topic {topic} on "
            f"{bootstrap} ({source}): no live pipeline was set up there (`meltica streams topics create`)",
            highlight=False,
        )
        return not required
    console.print(f"live pipeline notified: command {command.command_id} on {topic} {where}", highlight=False)
    return True


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
