"""Real servers for integration tests: the dev Kafka broker and PostgreSQL, started once per session.

Both fixtures go through the same code as `meltica infra up`, so a broker or database that is already
running is reused (and left running afterwards, like `up`). Database fixtures create, migrate and yield
engines as the owner role (``PostgresEndpoint.url``); ``runtime_url_of``/``runtime_engine`` give the same
database as the runtime role, which is what runtime commands connect as in production.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from meltica.infra.kafka import KafkaEndpoint, ensure_kafka
from meltica.infra.postgres import PostgresEndpoint, ensure_postgres
from tests.integration.databases import drop_test_database

# A name made for one test run: a hex run of 8+ characters (uuid-based prefixes, app ids, group names).
_TEST_NAME = re.compile(r"[0-9a-f]{8,}")
KEEP_TOPICS_ENV = "MELTICA_TEST_KEEP_TOPICS"


@pytest.fixture(scope="session")
def kafka_endpoint() -> Iterator[KafkaEndpoint]:
    """The dev broker. At the end of the session, the topics this session's tests made (new since it began,
    with a run-specific hex name) are deleted: the broker keeps every partition's files open, and the topics
    of a few full runs exhaust its open-files limit ("Too many open files": it stops accepting connections).
    ``MELTICA_TEST_KEEP_TOPICS=1`` keeps them (to look at them, or while other test sessions share the
    broker)."""
    endpoint = ensure_kafka()
    before = _topics(endpoint.bootstrap_servers)
    yield endpoint
    if os.environ.get(KEEP_TOPICS_ENV) == "1" or before is None:
        return
    after = _topics(endpoint.bootstrap_servers) or set()
    made = sorted(name for name in after - before if _TEST_NAME.search(name))
    _delete_topics(endpoint.bootstrap_servers, made)


def _topics(bootstrap: str) -> set[str] | None:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    except Exception:
        return None
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from kafka import KafkaAdminClient

    if not names:
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=60_000)
    try:
        for start in range(0, len(names), 200):
            with contextlib.suppress(Exception):  # cleanup only: a topic already gone is fine
                admin.delete_topics(names[start : start + 200], timeout_ms=60_000)
    finally:
        admin.close()


@pytest.fixture(scope="session")
def postgres_endpoint() -> PostgresEndpoint:
    return ensure_postgres()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """``unique_name("orders")`` → ``"orders-<hex>"``: topic/group names that never collide across runs."""

    def make(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` → a TCP port on loopback that nothing listens on right now."""

    def pick() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return pick


def runtime_url_of(engine: Engine) -> str:
    """``engine``'s database as the runtime role (``meltica_app`` locally): the rights the migrations grant."""
    return ensure_postgres().runtime_url_for(str(engine.url.database))


@pytest.fixture
def runtime_engine() -> Iterator[Callable[[Engine], Engine]]:
    """``runtime_engine(owner_engine)`` → an engine on the same database as the runtime role (disposed after)."""
    from meltica.storage.engine import make_engine

    made: list[Engine] = []

    def make(engine: Engine) -> Engine:
        made.append(make_engine(runtime_url_of(engine)))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


@contextlib.contextmanager
def temporary_database(endpoint: PostgresEndpoint, *, migrated: bool = True) -> Iterator[Engine]:
    """A new database on the real server (migrated to head unless ``migrated=False``), dropped afterwards."""
    from sqlalchemy import text

    from meltica.storage import migrate
    from meltica.storage.engine import make_engine

    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(endpoint.url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(endpoint.url_for(name))
    try:
        if migrated:
            migrate.upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            drop_test_database(conn, name)
        admin.dispose()


@pytest.fixture
def fresh_database(postgres_endpoint: PostgresEndpoint) -> Iterator[Engine]:
    """A new database migrated to head, for one test."""
    with temporary_database(postgres_endpoint) as engine:
        yield engine


@pytest.fixture(scope="session")
def database_factory(
    postgres_endpoint: PostgresEndpoint,
) -> Callable[..., contextlib.AbstractContextManager[Engine]]:
    """``with database_factory(migrated=False) as engine:`` — :func:`temporary_database` on the session's server."""
    return lambda **kw: temporary_database(postgres_endpoint, **kw)


@pytest.fixture(scope="module")
def module_database(postgres_endpoint: PostgresEndpoint) -> Iterator[Engine]:
    """A new database migrated to head, shared by the tests of one module."""
    with temporary_database(postgres_endpoint) as engine:
        yield engine


@pytest.fixture(scope="module")
def module_runtime_database(module_database: Engine) -> Iterator[Engine]:
    """``module_database`` as the runtime role: for tests of the application's runtime path, which in
    production has only the rights the migrations grant that role."""
    from meltica.storage.engine import make_engine

    engine = make_engine(runtime_url_of(module_database))
    yield engine
    engine.dispose()
