"""The one retry rule of every flow's tasks (DESIGN.md §5): a task is retried only for the taxonomy's retryable
family (a database or venue that is unreachable right now), never for a terminal error (a refused login, bad
input, a configuration or risk error).

:func:`meltica_task` is the only way the flows declare a task: it wraps the body so that a raw database error
(SQLAlchemy, psycopg) becomes the taxonomy's error with the server's reason in its message — "the database is
unavailable …: connection refused" and "the database refused the login …: password authentication failed"
read differently in the UI — and it applies the same retries and delays everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import psycopg
from prefect import task
from sqlalchemy.exc import DBAPIError

from meltica.errors import is_retryable
from meltica.storage.errors import classify_database_error

RETRIES = 3
RETRY_DELAY_SECONDS = [1, 5, 15]


def retry_only_retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: a terminal error (bad input, auth, risk) is never retried."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False


def classified(doing: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Re-raise a raw database error from the wrapped function as the taxonomy's error (cause in the message;
    the SQLAlchemy chain is dropped: it repeats the statement and its parameters)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (DBAPIError, psycopg.Error) as exc:
                error = classify_database_error(exc, doing)
                assert error is not None
                raise error from None

        return body

    return wrap


def meltica_task(doing: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with the project's retry rule; ``doing`` names the work in error messages ("backtest run")."""

    def wrap(fn: Callable[..., Any]) -> Any:
        settings: dict[str, Any] = {
            "retries": RETRIES,
            "retry_delay_seconds": RETRY_DELAY_SECONDS,
            "retry_condition_fn": retry_only_retryable,
            **options,
        }
        return task(**settings)(classified(doing)(fn))

    return wrap
