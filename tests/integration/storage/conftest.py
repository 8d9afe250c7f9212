"""A fresh, migrated database per test module, created on the real PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from meltica.storage import migrate
from meltica.storage.engine import make_engine


def _create_database(admin_url: str) -> tuple[str, str]:
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, admin_url


def _drop_database(admin_url: str, name: str) -> None:
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def empty_database(postgres_endpoint) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    """An empty database (no schema), dropped afterwards."""
    name, admin_url = _create_database(postgres_endpoint.url)
    engine = make_engine(postgres_endpoint.url_for(name))
    try:
        yield engine
    finally:
        engine.dispose()
        _drop_database(admin_url, name)


@pytest.fixture(scope="module")
def migrated_database(postgres_endpoint) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    """A database migrated to head, shared by the tests of one module."""
    name, admin_url = _create_database(postgres_endpoint.url)
    engine = make_engine(postgres_endpoint.url_for(name))
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        _drop_database(admin_url, name)
