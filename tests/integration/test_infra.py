"""`meltica infra`: idempotent start, status, the embedded PostgreSQL path, Kafka stop/start, compose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from meltica import infra
from meltica.errors import InfrastructureUnavailableError
from meltica.infra import kafka as infra_kafka
from meltica.infra import postgres as infra_postgres
from meltica.infra._common import cache_dir, pid_alive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MELTICA = str(Path(sys.executable).parent / "meltica")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_up_is_idempotent_and_status_reports_real_servers(
    kafka_endpoint: infra.KafkaEndpoint, postgres_endpoint: infra.PostgresEndpoint
) -> None:
    pid_before = infra.kafka_status().pid
    first = infra.up()
    second = infra.up()
    assert [s.service for s in first] == [s.service for s in second] == ["postgres", "kafka", "prefect"]
    assert infra.kafka_status().pid == pid_before is not None

    rows = {row.service: row for row in infra.status()}
    kafka = rows["kafka"]
    assert kafka.running
    assert kafka.version == "3.9.1"
    assert kafka.kind == "Apache Kafka 3.9.1 (KRaft)"
    assert kafka.address == kafka_endpoint.bootstrap_servers
    pg = rows["postgres"]
    assert pg.running
    assert pg.kind.startswith("PostgreSQL ")
    assert pg.version is not None
    assert pg.version.split(".")[0].isdigit()
    assert rows["prefect"].kind.startswith("Prefect")

    with psycopg.connect(_libpq(postgres_endpoint.url), connect_timeout=5) as conn:
        # the names the endpoint's URL gives (MELTICA_DATABASE_URL may name another database or role)
        named = make_url(postgres_endpoint.url)
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (named.username, named.database)
    assert postgres_endpoint.url_for("other").endswith("/other")
    # runtime commands connect as the runtime role, `meltica db` as the owner
    assert infra_postgres.database_url() in {postgres_endpoint.runtime_url, os.environ.get("MELTICA_DATABASE_URL")}
    if postgres_endpoint.kind != "external":
        assert infra_postgres.migration_database_url() == postgres_endpoint.url


def test_cli_up_and_status_json_never_print_the_password(postgres_endpoint: infra.PostgresEndpoint) -> None:
    password = postgres_endpoint.url.split(":")[2].split("@")[0]
    up = subprocess.run([MELTICA, "infra", "up"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert up.returncode == 0, up.stderr
    status = subprocess.run(
        [MELTICA, "infra", "status", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert status.returncode == 0, status.stderr
    rows = {row["service"]: row for row in json.loads(status.stdout)}
    assert rows["kafka"]["running"]
    assert rows["postgres"]["running"]
    table = subprocess.run([MELTICA, "infra", "status"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    for out in (up.stdout + up.stderr, status.stdout, table.stdout):
        assert password not in out
        assert "***" in out or "postgres" in out


def test_external_database_url_is_used_as_is(
    postgres_endpoint: infra.PostgresEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MELTICA_DATABASE_URL", postgres_endpoint.url)
    monkeypatch.setenv("MELTICA_PG_MODE", "auto")
    endpoint = infra_postgres.ensure_postgres()
    assert endpoint.kind == "external"
    assert endpoint.url == postgres_endpoint.url == infra_postgres.database_url()
    assert "***" in repr(endpoint)

    monkeypatch.setenv("MELTICA_DATABASE_URL", "postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(InfrastructureUnavailableError) as err:
        infra_postgres.ensure_postgres()
    assert "secret" not in str(err.value)


def test_embedded_postgres_starts_answers_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    port = free_port()
    monkeypatch.setenv("MELTICA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MELTICA_PG_MODE", "embedded")
    monkeypatch.setenv("MELTICA_PG_PORT", str(port))
    monkeypatch.delenv("MELTICA_DATABASE_URL", raising=False)
    try:
        endpoint = infra_postgres.ensure_postgres()
        assert endpoint.kind == "embedded"
        assert f"@127.0.0.1:{port}/meltica" in endpoint.url
        password_file = tmp_path / "state" / "postgres" / "password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        with psycopg.connect(_libpq(endpoint.url), connect_timeout=5, autocommit=True) as conn:
            assert conn.execute("SELECT 20 + 22").fetchone() == (42,)
            conn.execute("CREATE DATABASE scratch")  # the role can create databases (tests need it)
            roles = dict(
                conn.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname LIKE 'meltica%'").fetchall()
            )
        assert roles == {"meltica": False, "meltica_app": False}  # the superuser is `postgres`, unused
        with psycopg.connect(_libpq(endpoint.runtime_url), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("meltica_app",)
        for name in ("password", "meltica_app.password", "postgres.password"):
            assert (tmp_path / "state" / "postgres" / name).stat().st_mode & 0o777 == 0o600
        with psycopg.connect(_libpq(endpoint.url_for("scratch")), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("scratch",)

        again = infra_postgres.ensure_postgres()  # idempotent: same server
        assert again == endpoint
        status = infra_postgres.postgres_status()
        assert status.running
        assert status.kind == f"PostgreSQL {endpoint.version} (embedded)"
        pid = status.pid
    finally:
        stopped = infra_postgres.stop_postgres()
    assert stopped
    assert not infra_postgres.postgres_status().running
    assert pid is not None
    deadline = time.monotonic() + 10  # pg_ctl -w returns when postmaster.pid is gone, just before exit
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


def test_kafka_stop_and_start_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    shared_cache = cache_dir()  # reuse the downloaded jars, keep everything else separate
    monkeypatch.setenv("MELTICA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MELTICA_CACHE_DIR", str(shared_cache))
    port, cport = free_port(), free_port()
    while cport == port:
        cport = free_port()
    monkeypatch.setenv("MELTICA_KAFKA_PORT", str(port))
    monkeypatch.setenv("MELTICA_KAFKA_CONTROLLER_PORT", str(cport))
    try:
        endpoint = infra_kafka.ensure_kafka()
        assert endpoint.bootstrap_servers == f"127.0.0.1:{port}"
        assert (endpoint.kind, endpoint.version) == ("apache-kafka", "3.9.1")
        pid = infra_kafka.kafka_status().pid
        assert pid is not None
        assert infra_kafka.ensure_kafka() == endpoint
        assert infra_kafka.kafka_status().pid == pid
        assert (tmp_path / "state" / "kafka" / "server.log").stat().st_size > 0

        assert infra_kafka.stop_kafka()
        assert not infra_kafka.kafka_status().running
        assert not infra_kafka.stop_kafka()  # nothing left to stop

        restarted = infra_kafka.ensure_kafka()  # same data dir: already formatted
        assert restarted == endpoint
        assert infra_kafka.kafka_status().pid not in (None, pid)
    finally:
        infra_kafka.stop_kafka()
    assert not infra_kafka.kafka_status().running


def test_compose_file_validates() -> None:
    script = ROOT / "infra" / "validate-compose.sh"
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode == 3:
        pytest.skip(f"no compose validator could be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    for service in ("kafka-1", "kafka-2", "kafka-3", "timescaledb", "prefect-server", "prefect-worker"):
        assert f"  {service}:" in proc.stdout
    assert "stream-worker:" in proc.stdout
