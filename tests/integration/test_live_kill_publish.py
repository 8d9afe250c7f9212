"""`meltica kill on|off` on a real broker and PostgreSQL: the database changes, a decodable
KillSwitchCommand lands on the (prefixed) control topic, and a risk gate fed with it blocks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine

from meltica.config.settings import RiskLimits
from meltica.domain import Instrument, OrderIntent, OrderType, Side
from meltica.infra.kafka import KafkaEndpoint
from meltica.live.processor import Incoming
from meltica.live.risk_gate import RiskGate
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue
from meltica.messaging.codec import Codec
from meltica.messaging.schemas import KillSwitchCommand, RejectionNotice, SubmitRequest
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore

pytestmark = pytest.mark.integration


def meltica_kill(database: Engine, *args: str, prefix: str, bootstrap: str | None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MELTICA_DATABASE_URL": database.url.render_as_string(hide_password=False),
        "MELTICA_TOPIC_PREFIX": prefix,
        "COLUMNS": "250",
    }
    env.pop("MELTICA_KAFKA_BOOTSTRAP", None)
    if bootstrap is not None:
        env["MELTICA_KAFKA_BOOTSTRAP"] = bootstrap
    return subprocess.run(
        [sys.executable, "-m", "meltica", "kill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def read_control(bootstrap: str, catalogue: Catalogue, expected: int) -> list[tuple[bytes, KillSwitchCommand]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        catalogue.topic_name("control"),
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10_000,
    )
    codec = Codec(catalogue)
    out: list[tuple[bytes, KillSwitchCommand]] = []
    try:
        for record in consumer:
            out.append((record.key, codec.decode("control", record.value)))
            if len(out) >= expected:
                break
    finally:
        consumer.close()
    return out


def test_kill_on_and_off_publish_commands_a_risk_gate_obeys(
    kafka_endpoint: KafkaEndpoint, fresh_database: Engine, unique_name: Callable[[str], str]
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("killpub") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(bootstrap, catalogue)

    on = meltica_kill(
        fresh_database,
        "on",
        "--scope",
        "account:main",
        "--reason",
        "venue incident",
        "--actor",
        "ops-1",
        prefix=prefix,
        bootstrap=bootstrap,
    )
    assert on.returncode == 0, on.stderr
    assert "account:main: off → halt by ops-1: venue incident" in on.stdout
    match = re.search(r"command (kill-[0-9a-f]+) on " + re.escape(prefix) + r"control", on.stdout)
    assert match, on.stdout
    off = meltica_kill(
        fresh_database, "off", "--scope", "account:main", "--reason", "over", prefix=prefix, bootstrap=bootstrap
    )
    assert off.returncode == 0, off.stderr

    (key_on, command_on), (key_off, command_off) = read_control(bootstrap, catalogue, 2)
    assert key_on == b"account:main" and key_off == b"account:main"
    assert isinstance(command_on, KillSwitchCommand)
    assert command_on.command_id == match.group(1)
    assert (command_on.scope, command_on.mode, command_on.reason, command_on.actor) == (
        "account:main",
        "halt",
        "venue incident",
        "ops-1",
    )
    assert (command_off.mode, command_off.reason) == ("off", "over")
    assert KillSwitch(KillSwitchStore(fresh_database)).state_of("account:main").mode is KillSwitchMode.OFF

    # the decoded command does what it says in the risk gate
    instrument = Instrument(
        exchange="binance", symbol="BTC/USDT", base="BTC", quote="USDT", tick_size="0.01", step_size="0.001"
    )
    gate = RiskGate(RiskLimits(), {("binance", "BTC/USDT"): instrument})
    asyncio.run(gate.handle(Incoming("control", key_on.decode(), command_on)))
    order = OrderIntent(
        intent_id="s:1",
        account="main",
        strategy="s",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=Decimal("0.01"),
        price=Decimal("20000"),
        created_at=command_on.ts,
    )
    request = SubmitRequest(request_id="s:1", account="main", strategy="s", ts=command_on.ts, intent=order)
    out = asyncio.run(gate.handle(Incoming("orders.intents", "main", request)))
    notice = out[0].value
    assert isinstance(notice, RejectionNotice) and notice.decision.rule == "kill_switch"


def test_an_unreachable_broker_fails_the_command_after_the_database_change(
    fresh_database: Engine, unique_name: Callable[[str], str], free_port: Callable[[], int]
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    result = meltica_kill(
        fresh_database, "on", "--reason", "test", "--timeout", "2", prefix=unique_name("x") + ".", bootstrap=nowhere
    )
    assert result.returncode == 1
    assert "global: off → halt" in result.stdout
    assert "live pipeline was NOT notified" in result.stderr and nowhere in result.stderr
    assert KillSwitch(KillSwitchStore(fresh_database)).state.mode is KillSwitchMode.HALT


def test_no_control_topic_means_no_pipeline_to_notify(
    kafka_endpoint: KafkaEndpoint, fresh_database: Engine, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("nopipe") + "."
    result = meltica_kill(
        fresh_database, "on", "--reason", "test", prefix=prefix, bootstrap=kafka_endpoint.bootstrap_servers
    )
    assert result.returncode == 0, result.stderr
    assert f"no topic {prefix}control" in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_endpoint.bootstrap_servers)
    try:
        assert f"{prefix}control" not in admin.list_topics()  # not auto-created by the command
    finally:
        admin.close()
    assert KillSwitch(KillSwitchStore(fresh_database)).state.mode is KillSwitchMode.HALT


def _deployment_file(tmp_path: Path, *, database_url: str, bootstrap: str, prefix: str) -> Path:
    """A live deployment's settings: one account, one instance, the given database, broker and prefix."""
    path = tmp_path / "live.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "environment": "dev",
                "database_url": database_url,
                "kafka": {"bootstrap_servers": bootstrap},
                "accounts": [{"name": "main", "exchange": "binance"}],
                "live": {
                    "topic_prefix": prefix,
                    "instances": [
                        {"instance_id": "mom-1", "strategy": "momentum", "account": "main", "symbols": ["BTC/USDT"]}
                    ],
                },
            }
        )
    )
    return path


def _kill_with_config(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MELTICA_KAFKA", "MELTICA_TOPIC_PREFIX"))}
    env.pop("MELTICA_DATABASE_URL", None)
    env["COLUMNS"] = "250"
    return subprocess.run(
        [sys.executable, "-m", "meltica", "kill", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_with_the_database_down_kill_on_still_halts_the_pipeline_and_fails_loudly(
    kafka_endpoint: KafkaEndpoint, tmp_path: Path, unique_name: Callable[[str], str], free_port: Callable[[], int]
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("killdbdown") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(bootstrap, catalogue)
    # Nothing listens on this port: every connection is refused, as with a stopped database server.
    down = f"postgresql+psycopg://meltica:secret@127.0.0.1:{free_port()}/meltica"
    config = _deployment_file(tmp_path, database_url=down, bootstrap=bootstrap, prefix=prefix)

    result = _kill_with_config("on", "--config", str(config), "--reason", "db outage drill", "--timeout", "5")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "database was NOT updated" in result.stderr
    assert "the live pipeline was told to halt" in result.stderr
    assert "secret" not in result.stdout + result.stderr
    ((key, command),) = read_control(bootstrap, catalogue, 1)
    assert key == b"global" and (command.mode, command.reason) == ("halt", "db outage drill")


def test_with_a_config_the_scope_must_exist_and_the_settings_broker_is_used(
    kafka_endpoint: KafkaEndpoint, fresh_database: Engine, tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    prefix = unique_name("killcfg") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(bootstrap, catalogue)
    url = fresh_database.url.render_as_string(hide_password=False)
    config = _deployment_file(tmp_path, database_url=url, bootstrap=bootstrap, prefix=prefix)

    typo = _kill_with_config("on", "--config", str(config), "--scope", "account:mian", "--reason", "x")
    assert typo.returncode == 2
    assert "no account named 'mian'" in typo.stderr and "main" in typo.stderr
    assert KillSwitch(KillSwitchStore(fresh_database)).states() == {}  # nothing engaged by a refused command

    on = _kill_with_config("on", "--config", str(config), "--scope", "strategy:mom-1", "--reason", "drill")
    assert on.returncode == 0, on.stderr
    assert KillSwitch(KillSwitchStore(fresh_database)).state_of("strategy:mom-1").mode is KillSwitchMode.HALT
    ((key, command),) = read_control(bootstrap, catalogue, 1)
    assert key == b"strategy:mom-1" and command.mode == "halt"

    # a deployment whose pipeline cannot be told (no control topic under another prefix) is a failure
    other = _deployment_file(tmp_path, database_url=url, bootstrap=bootstrap, prefix=unique_name("nothere") + ".")
    untold = _kill_with_config("off", "--config", str(other), "--scope", "strategy:mom-1", "--reason", "x")
    assert untold.returncode == 1 and "live pipeline not notified" in untold.stderr


def test_the_settings_spelling_of_the_bootstrap_variable_is_honoured(
    kafka_endpoint: KafkaEndpoint, fresh_database: Engine, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    prefix = unique_name("killenv") + "."
    catalogue = Catalogue(prefix=prefix)
    create_topics(kafka_endpoint.bootstrap_servers, catalogue)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELTICA_KAFKA")}
    env |= {
        "MELTICA_DATABASE_URL": fresh_database.url.render_as_string(hide_password=False),
        "MELTICA_TOPIC_PREFIX": prefix,
        "MELTICA_KAFKA__BOOTSTRAP_SERVERS": kafka_endpoint.bootstrap_servers,
        "MELTICA_STATE_DIR": str(tmp_path),  # no dev broker to fall back on: only the variable names one
        "COLUMNS": "250",
    }
    result = subprocess.run(
        [sys.executable, "-m", "meltica", "kill", "on", "--reason", "env"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "live pipeline notified" in result.stdout
    ((_, command),) = read_control(kafka_endpoint.bootstrap_servers, catalogue, 1)
    assert command.reason == "env"
