"""Databases for the storage tests, created on the real PostgreSQL server (see ../conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine


@pytest.fixture
def empty_database(
    database_factory: Callable[..., contextlib.AbstractContextManager[Engine]],
) -> Iterator[Engine]:
    """An empty database (no schema), dropped afterwards."""
    with database_factory(migrated=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def migrated_database(module_database: Engine) -> Engine:
    """A database migrated to head, shared by the tests of one module."""
    return module_database
