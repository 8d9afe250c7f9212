"""Real servers for integration tests: the dev Kafka broker and PostgreSQL, started once per session.

Both fixtures go through the same code as `meltica infra up`, so a broker or database that is already
running is reused (and left running afterwards, like `up`). Database fixtures create, migrate and yield
engines as the owner role (``PostgresEndpoint.url``); ``runtime_url_of``/``runtime_engine`` give the same
database as the runtime role, which is what runtime commands connect as in production.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from meltica.infra.kafka import KafkaEndpoint, ensure_kafka
from meltica.infra.postgres import PostgresEndpoint, ensure_postgres
from tests.integration.databases import drop_test_database
from tests.session_topics import record_before, run_dir, worker_id


@pytest.fixture(scope="session")
def kafka_endpoint(pytestconfig: pytest.Config) -> KafkaEndpoint:
    """The dev broker. The topics this run's tests make (new since the run began, with a run-specific hex
    name) are deleted when the whole run ends, by the main process (tests/session_topics.py; under
    pytest-xdist, never by one worker while another still uses them): the broker keeps every partition's
    files open, and the topics of a few full runs exhaust its open-files limit ("Too many open files": it
    stops accepting connections). ``MELTICA_TEST_KEEP_TOPICS=1`` keeps them (to look at them, or while other
    test sessions share the broker)."""
    endpoint = ensure_kafka()
    record_before(run_dir(pytestconfig), worker_id(), endpoint.bootstrap_servers)
    return endpoint


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
