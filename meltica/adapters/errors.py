"""ccxt's exceptions → Meltica's error taxonomy (DESIGN.md §5), at the adapter boundary.

Every class in ``ccxt.base.errors`` has an explicit row in ``CCXT_ERROR_MAP`` (a unit test walks the
hierarchy to prove it); a class ccxt adds later falls back to its nearest mapped ancestor.

``venue_call()`` wraps every ccxt call the adapter makes, so nothing above ``meltica/adapters/`` ever
sees a ccxt class::

    with venue_call(exchange, "create_order", symbol=symbol):
        raw = await exchange.create_order(...)

The venue's own reason text (``binance {"code":-2010,"msg":"Account has insufficient balance"}``)
is kept in the message and in ``details["venue_message"]``; query-string secrets (signature, api key)
are scrubbed from it, as are the credential values themselves.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from ccxt.base import errors as ccxt_errors

from meltica.errors import (
    AuthenticationError,
    BookChecksumError,
    ClockSkewError,
    ConfigurationError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvalidOrderError,
    MelticaError,
    NetworkError,
    OrderNotFoundError,
    RateLimitError,
    RequestTimeoutError,
    RetryableError,
    TerminalError,
)

# ccxt class → (Meltica class, reason). Order matters only for readability; lookup walks the MRO.
CCXT_ERROR_MAP: dict[type[BaseException], tuple[type[MelticaError], str]] = {
    ccxt_errors.BaseError: (TerminalError, "venue_error"),
    # --- ExchangeError: the venue answered and refused ---------------------------------------
    ccxt_errors.ExchangeError: (TerminalError, "venue_error"),
    ccxt_errors.AuthenticationError: (AuthenticationError, "authentication"),
    ccxt_errors.PermissionDenied: (AuthenticationError, "permission_denied"),
    ccxt_errors.AccountNotEnabled: (AuthenticationError, "account_not_enabled"),
    ccxt_errors.AccountSuspended: (AuthenticationError, "account_suspended"),
    ccxt_errors.ArgumentsRequired: (TerminalError, "arguments_required"),
    ccxt_errors.BadRequest: (TerminalError, "bad_request"),
    ccxt_errors.BadSymbol: (TerminalError, "bad_symbol"),
    ccxt_errors.OperationRejected: (TerminalError, "operation_rejected"),
    ccxt_errors.NoChange: (TerminalError, "no_change"),
    ccxt_errors.MarginModeAlreadySet: (TerminalError, "no_change"),
    ccxt_errors.MarketClosed: (TerminalError, "market_closed"),
    ccxt_errors.ManualInteractionNeeded: (TerminalError, "manual_interaction_needed"),
    ccxt_errors.RestrictedLocation: (AuthenticationError, "restricted_location"),
    ccxt_errors.InsufficientFunds: (InsufficientFundsError, "insufficient_funds"),
    ccxt_errors.InvalidAddress: (TerminalError, "invalid_address"),
    ccxt_errors.AddressPending: (TerminalError, "address_pending"),
    ccxt_errors.InvalidOrder: (InvalidOrderError, "invalid_order"),
    ccxt_errors.OrderNotFound: (OrderNotFoundError, "order_not_found"),
    ccxt_errors.OrderNotCached: (OrderNotFoundError, "order_not_cached"),
    ccxt_errors.OrderImmediatelyFillable: (InvalidOrderError, "would_take_liquidity"),
    ccxt_errors.OrderNotFillable: (InvalidOrderError, "not_fillable"),
    ccxt_errors.DuplicateOrderId: (InvalidOrderError, "duplicate_client_order_id"),
    ccxt_errors.ContractUnavailable: (InvalidOrderError, "contract_unavailable"),
    ccxt_errors.NotSupported: (TerminalError, "not_supported"),
    ccxt_errors.InvalidProxySettings: (ConfigurationError, "invalid_proxy_settings"),
    ccxt_errors.ExchangeClosedByUser: (TerminalError, "closed_by_user"),
    # --- OperationFailed: the request did not complete; repeating may work -------------------
    ccxt_errors.OperationFailed: (RetryableError, "operation_failed"),
    # A network failure after the request left the process: it may have reached the venue.
    ccxt_errors.NetworkError: (RequestTimeoutError, "network"),
    ccxt_errors.RequestTimeout: (RequestTimeoutError, "timeout"),
    ccxt_errors.DDoSProtection: (RateLimitError, "rate_limited"),
    ccxt_errors.RateLimitExceeded: (RateLimitError, "rate_limited"),
    ccxt_errors.ExchangeNotAvailable: (ExchangeUnavailableError, "exchange_unavailable"),
    ccxt_errors.OnMaintenance: (ExchangeUnavailableError, "maintenance"),
    ccxt_errors.InvalidNonce: (ClockSkewError, "clock_skew"),
    ccxt_errors.ChecksumError: (BookChecksumError, "book_checksum"),
    # The venue answered but the answer was unreadable: the request did reach it.
    ccxt_errors.BadResponse: (RequestTimeoutError, "bad_response"),
    ccxt_errors.NullResponse: (RequestTimeoutError, "null_response"),
    ccxt_errors.CancelPending: (RetryableError, "cancel_pending"),
    ccxt_errors.UnsubscribeError: (TerminalError, "unsubscribe_failed"),
}

# Binance error codes that ccxt maps to a class too coarse for us (per-API tables differ).
_BINANCE_CODE_OVERRIDES: dict[int, tuple[type[MelticaError], str]] = {
    -1021: (ClockSkewError, "clock_skew"),  # timestamp outside recvWindow
    -1001: (ExchangeUnavailableError, "exchange_unavailable"),  # internal error (5xx): status unknown
    -1003: (RateLimitError, "rate_limited"),  # too much request weight
    -1015: (RateLimitError, "rate_limited"),  # too many new orders
    -2010: (InvalidOrderError, "invalid_order"),  # NEW_ORDER_REJECTED
    -2013: (OrderNotFoundError, "order_not_found"),
}

_SECRET_QUERY = re.compile(
    r"(?i)\b(signature|sign|apikey|api_key|api-key|secret|secretkey|passphrase|password|token|listenkey|x-mbx-apikey)"
    r"(=|:\s*|\"\s*:\s*\")[^&\s\"',}]+"
)
_CODE = re.compile(r'"code"\s*:\s*(-?\d+)')
_HTTP_STATUS = re.compile(r"\b(418|429)\b")


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with query/JSON secrets and the given secret values replaced by ``***``."""
    out = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return out


def venue_code(message: str) -> int | None:
    """The venue's numeric error code in a ccxt message (Binance ``{"code":-2010,...}``)."""
    match = _CODE.search(message)
    return int(match.group(1)) if match else None


def parse_retry_after(headers: Mapping[str, Any] | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent."""
    if not headers:
        return None
    value = None
    for key, raw in headers.items():
        if str(key).lower() == "retry-after":
            value = str(raw).strip()
            break
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def _lookup(cls: type[BaseException]) -> tuple[type[MelticaError], str]:
    for klass in cls.__mro__:
        if klass in CCXT_ERROR_MAP:
            return CCXT_ERROR_MAP[klass]
    return TerminalError, "venue_error"


def map_ccxt_error(
    exc: BaseException,
    *,
    exchange_id: str | None = None,
    operation: str | None = None,
    headers: Mapping[str, Any] | None = None,
    secrets: tuple[str, ...] = (),
    **context: Any,
) -> MelticaError:
    """The Meltica error for ``exc`` (a ccxt exception, or a raw network error from below ccxt)."""
    if isinstance(exc, MelticaError):
        return exc
    venue_message = scrub(str(exc), secrets)
    if isinstance(exc, ccxt_errors.BaseError):
        target, reason = _lookup(type(exc))
    elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
        target, reason = RequestTimeoutError, "timeout"
    elif isinstance(exc, ConnectionError | OSError):
        target, reason = NetworkError, "network"
    else:
        target, reason = TerminalError, "venue_error"
    code = venue_code(venue_message)
    # Refine only a generic mapping (ccxt's per-API tables differ); -1021 is always clock skew.
    is_binance = (exchange_id or "").startswith("binance")
    if is_binance and code in _BINANCE_CODE_OVERRIDES and (code == -1021 or target in (TerminalError, RetryableError)):
        target, reason = _BINANCE_CODE_OVERRIDES[code]
    details: dict[str, Any] = {
        "venue_message": venue_message,
        "ccxt_error": type(exc).__name__,
        **{k: v for k, v in context.items() if v is not None},
    }
    if exchange_id:
        details["exchange"] = exchange_id
    if operation:
        details["operation"] = operation
    if code is not None:
        details["venue_code"] = code
    prefix = f"{exchange_id or 'venue'} {operation or 'call'}"
    message = f"{prefix}: {type(exc).__name__}: {venue_message}" if venue_message else f"{prefix}: {type(exc).__name__}"
    if issubclass(target, RateLimitError):
        retry_after = parse_retry_after(headers)
        status = _HTTP_STATUS.search(venue_message)
        if status and status.group(1) == "418":
            reason = "ip_banned"
        return RateLimitError(message, retry_after=retry_after, reason=reason, **details)
    if issubclass(target, ConfigurationError):
        return ConfigurationError(message, reason=reason, **details)
    return target(message, reason=reason, **details)


class venue_call:  # noqa: N801 - used as a context manager / decorator, reads like a function
    """Context manager that re-raises any ccxt (or raw network) exception as a Meltica error.

    ``exchange`` (a ccxt instance, optional) supplies the id, the last response headers (for
    ``Retry-After``) and the credential values to scrub from messages.
    """

    __slots__ = ("_context", "_exchange", "_operation")

    def __init__(self, exchange: Any = None, operation: str | None = None, **context: Any) -> None:
        self._exchange = exchange
        self._operation = operation
        self._context = context

    def __enter__(self) -> venue_call:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or isinstance(exc, MelticaError):
            return
        # Programming errors, cancellation and interrupts stay what they are.
        if isinstance(exc, ccxt_errors.BaseError | TimeoutError | OSError):
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> MelticaError:
        exchange = self._exchange
        exchange_id = getattr(exchange, "id", None) if exchange is not None else None
        headers = getattr(exchange, "last_response_headers", None) if exchange is not None else None
        secrets = tuple(
            str(getattr(exchange, name, "") or "") for name in ("apiKey", "secret", "password", "uid", "privateKey")
        )
        return map_ccxt_error(
            exc,
            exchange_id=exchange_id,
            operation=self._operation,
            headers=headers if isinstance(headers, Mapping) else None,
            secrets=secrets,
            **self._context,
        )


P = ParamSpec("P")
R = TypeVar("R")


def venue_errors(operation: str | None = None) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorator form for async methods of an object with an ``exchange`` attribute (the ccxt instance)."""

    def wrap(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        name = operation or func.__name__

        @functools.wraps(func)
        async def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            exchange = getattr(args[0], "exchange", None) if args else None
            with venue_call(exchange, name):
                result = await func(*args, **kwargs)
            return result

        return inner

    return wrap
