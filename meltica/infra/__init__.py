"""Local infrastructure started by Meltica itself: PostgreSQL, Apache Kafka, and Prefect's API.

``up()`` starts what is missing and waits until each service answers; ``down()`` stops only what
Meltica started; ``status()`` reports without starting anything. State (PID files, logs, data,
caches) lives under ``.meltica/`` at the repository root, or ``MELTICA_STATE_DIR``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.table import Table

from meltica.infra._common import ServiceStatus, mask_url, state_dir
from meltica.infra.kafka import KafkaEndpoint, ensure_kafka, kafka_status, stop_kafka
from meltica.infra.postgres import PostgresEndpoint, ensure_postgres, postgres_status, stop_postgres
from meltica.infra.prefect import prefect_api_url, prefect_status

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "KafkaEndpoint",
    "PostgresEndpoint",
    "ServiceStatus",
    "StartedService",
    "down",
    "ensure_kafka",
    "ensure_postgres",
    "kafka_status",
    "mask_url",
    "postgres_status",
    "prefect_api_url",
    "prefect_status",
    "state_dir",
    "status",
    "status_table",
    "stop_kafka",
    "stop_postgres",
    "up",
]


@dataclass(frozen=True)
class StartedService:
    """What ``up()`` did for one service; ``address`` never carries a password."""

    service: str
    kind: str
    address: str
    seconds: float


def up(*, postgres: bool = True, kafka: bool = True) -> list[StartedService]:
    """Start (or reuse) PostgreSQL and Kafka and wait until they answer. Idempotent."""
    results: list[StartedService] = []
    if postgres:
        t0 = time.monotonic()
        pg = ensure_postgres()
        kind = {"external": "external", "system": "system cluster", "embedded": "embedded"}[pg.kind]
        results.append(
            StartedService("postgres", f"PostgreSQL {pg.version} ({kind})", mask_url(pg.url), time.monotonic() - t0)
        )
    if kafka:
        t0 = time.monotonic()
        broker = ensure_kafka()
        results.append(StartedService("kafka", broker.description, broker.bootstrap_servers, time.monotonic() - t0))
    t0 = time.monotonic()
    prefect = prefect_status()
    results.append(StartedService("prefect", prefect.kind, prefect.address, time.monotonic() - t0))
    return results


def down() -> dict[str, bool]:
    """Stop what Meltica started (Kafka, and PostgreSQL only if ``up`` started it). Service → stopped."""
    stopped = {"kafka": stop_kafka()}
    stopped["postgres"] = stop_postgres()
    return stopped


def status() -> list[ServiceStatus]:
    """One row per service, without starting anything."""
    return [postgres_status(), kafka_status(), prefect_status()]


def status_table(rows: list[ServiceStatus] | None = None) -> Table:
    """``status()`` (or ``rows``) as a rich table; addresses are already password-masked."""
    table = Table(title="Meltica infrastructure")
    for column in ("service", "kind", "address", "state", "pid", "detail"):
        table.add_column(column, overflow="fold")
    for row in status() if rows is None else rows:
        table.add_row(
            row.service,
            row.kind,
            row.address,
            "[green]running[/]" if row.running else "[red]down[/]",
            str(row.pid) if row.pid else "-",
            row.detail,
        )
    return table
