"""Retry policy shared by every flow's tasks: retry only the taxonomy's retryable errors (DESIGN.md §5)."""

from __future__ import annotations

from typing import Any

from meltica.errors import is_retryable


def retry_only_retryable(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: a terminal error (bad input, auth, risk) is never retried."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False
