"""One error hierarchy for all of Meltica (DESIGN.md §5).

Callers act on two families differently:

* ``RetryableError`` — the same call may succeed later (network, timeout, rate limit, venue down).
  Retried with backoff; after a timeout on an order the order's fate is resolved by querying the
  venue before anything is re-sent.
* ``TerminalError`` — retrying cannot help (invalid order, insufficient funds, authentication,
  risk rejection, bad configuration). Recorded with its reason and surfaced.

Venue exceptions (ccxt's) are mapped into these at the adapter boundary; nothing above the adapter
catches a ccxt class. Messages must never carry secrets.
"""

from __future__ import annotations

from typing import Any


class MelticaError(Exception):
    """Root of every error Meltica raises on purpose.

    ``reason`` is a short machine-friendly code (stored with rejections and discrepancies);
    ``details`` holds structured context that is safe to log (never secrets).
    """

    retryable: bool = False
    default_reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return self.message


# --- retryable -------------------------------------------------------------------------------


class RetryableError(MelticaError):
    """The operation may succeed if repeated later."""

    retryable = True
    default_reason = "retryable"


class NetworkError(RetryableError):
    default_reason = "network"


class RequestTimeoutError(RetryableError):
    """The request may or may not have reached the venue: resolve before re-sending."""

    default_reason = "timeout"


class RateLimitError(RetryableError):
    """The venue asked us to slow down; ``retry_after`` (seconds) says for how long when known."""

    default_reason = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: float | None = None, reason: str | None = None, **details: Any
    ) -> None:
        super().__init__(message, reason=reason, **details)
        self.retry_after = retry_after


class ExchangeUnavailableError(RetryableError):
    default_reason = "exchange_unavailable"


class ClockSkewError(RetryableError):
    """The venue refused the request's timestamp (Binance -1021): resync the clock offset, then retry.

    The request was rejected before execution, so re-sending it cannot duplicate an order.
    """

    default_reason = "clock_skew"


class StaleStreamError(RetryableError):
    """No message on a stream for longer than the configured staleness limit."""

    default_reason = "stale_stream"


class BookGapError(RetryableError):
    """A diff does not continue the book's sequence: the book is stale, re-snapshot it."""

    default_reason = "book_gap"


class BookChecksumError(RetryableError):
    """The venue's order-book checksum disagrees with the local book: re-snapshot."""

    default_reason = "book_checksum"


class InfrastructureUnavailableError(RetryableError):
    """A server Meltica needs (database, broker) cannot be reached right now."""

    default_reason = "infrastructure_unavailable"


# --- terminal --------------------------------------------------------------------------------


class TerminalError(MelticaError):
    """Repeating the operation cannot succeed."""

    default_reason = "terminal"


class InvalidOrderError(TerminalError):
    default_reason = "invalid_order"


class InsufficientFundsError(TerminalError):
    default_reason = "insufficient_funds"


class AuthenticationError(TerminalError):
    default_reason = "authentication"


class OrderNotFoundError(TerminalError):
    default_reason = "order_not_found"


class RiskRejectedError(TerminalError):
    default_reason = "risk_rejected"


class ConfigurationError(TerminalError):
    """Configuration is invalid. ``source`` names the file, ``field`` the offending setting."""

    default_reason = "bad_configuration"

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, reason=reason, source=source, field=field, **details)
        self.source = source
        self.field = field


class DataValidationError(TerminalError):
    """Input data (a file, a message) is malformed. ``line`` names the offending row when known."""

    default_reason = "invalid_data"

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, reason=reason, source=source, line=line, **details)
        self.source = source
        self.line = line


class IllegalStateTransitionError(TerminalError):
    default_reason = "illegal_transition"


class InfrastructureError(TerminalError):
    """A server could not be started or configured, and retrying will not fix it."""

    default_reason = "infrastructure"


class StorageError(TerminalError):
    """The database refused a statement (missing table, permission, a failing TimescaleDB call): repeating it
    unchanged cannot succeed. The message is one line naming what was being done and the server's reason."""

    default_reason = "storage"


class SecretError(TerminalError):
    """A secret cannot be decrypted or is missing. Never includes the secret itself."""

    default_reason = "secret"


def is_retryable(error: BaseException) -> bool:
    """True when ``error`` belongs to the retryable family."""
    return isinstance(error, MelticaError) and error.retryable
