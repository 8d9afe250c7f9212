"""ccxt exception → Meltica taxonomy mapping (meltica/adapters/errors.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import ccxt
import pytest
from ccxt.base import errors as ccxt_errors

from meltica.adapters.errors import (
    CCXT_ERROR_MAP,
    ClockSkewError,
    map_ccxt_error,
    parse_retry_after,
    scrub,
    venue_call,
    venue_errors,
)
from meltica.errors import (
    AuthenticationError,
    ExchangeUnavailableError,
    InsufficientFundsError,
    InvalidOrderError,
    MelticaError,
    OrderNotFoundError,
    RateLimitError,
    RequestTimeoutError,
    RetryableError,
    TerminalError,
)


def _all_ccxt_errors() -> set[type[BaseException]]:
    seen: set[type[BaseException]] = set()
    stack: list[type[BaseException]] = [ccxt_errors.BaseError]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
    # Only ccxt's own classes (tests or other libraries may subclass them).
    return {cls for cls in seen if cls.__module__.startswith("ccxt")}


def test_every_ccxt_error_class_has_an_explicit_mapping() -> None:
    classes = _all_ccxt_errors()
    assert len(classes) > 30
    unmapped = sorted(cls.__name__ for cls in classes if cls not in CCXT_ERROR_MAP)
    assert unmapped == []
    for name in ccxt_errors.__all__:
        cls = getattr(ccxt_errors, name)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            assert cls in CCXT_ERROR_MAP, name


@pytest.mark.parametrize("cls", sorted(_all_ccxt_errors(), key=lambda c: c.__name__))
def test_every_ccxt_error_maps_into_one_family(cls: type[BaseException]) -> None:
    mapped = map_ccxt_error(cls("binance boom"), exchange_id="binance")
    assert isinstance(mapped, MelticaError)
    assert isinstance(mapped, RetryableError) != isinstance(mapped, TerminalError)
    assert "boom" in mapped.message


@pytest.mark.parametrize(
    ("cls", "expected", "retryable"),
    [
        (ccxt.NetworkError, RequestTimeoutError, True),
        (ccxt.RequestTimeout, RequestTimeoutError, True),
        (ccxt.DDoSProtection, RateLimitError, True),
        (ccxt.RateLimitExceeded, RateLimitError, True),
        (ccxt.ExchangeNotAvailable, ExchangeUnavailableError, True),
        (ccxt.OnMaintenance, ExchangeUnavailableError, True),
        (ccxt.InvalidNonce, ClockSkewError, True),
        (ccxt.AuthenticationError, AuthenticationError, False),
        (ccxt.PermissionDenied, AuthenticationError, False),
        (ccxt.AccountSuspended, AuthenticationError, False),
        (ccxt.InsufficientFunds, InsufficientFundsError, False),
        (ccxt.InvalidOrder, InvalidOrderError, False),
        (ccxt.OrderImmediatelyFillable, InvalidOrderError, False),
        (ccxt.OrderNotFillable, InvalidOrderError, False),
        (ccxt.DuplicateOrderId, InvalidOrderError, False),
        (ccxt.OrderNotFound, OrderNotFoundError, False),
        (ccxt.BadSymbol, TerminalError, False),
        (ccxt.BadRequest, TerminalError, False),
        (ccxt.NotSupported, TerminalError, False),
    ],
)
def test_documented_mappings(cls: type[Exception], expected: type[MelticaError], retryable: bool) -> None:
    mapped = map_ccxt_error(cls("x"), exchange_id="kraken")
    assert type(mapped) is expected
    assert mapped.retryable is retryable


def test_venue_reason_text_is_kept() -> None:
    exc = ccxt.InsufficientFunds(
        'binance {"code":-2010,"msg":"Account has insufficient balance for requested action."}'
    )
    mapped = map_ccxt_error(exc, exchange_id="binance", operation="create_order", symbol="BTC/USDT")
    assert isinstance(mapped, InsufficientFundsError)
    assert '"code":-2010' in mapped.message
    assert "insufficient balance" in mapped.details["venue_message"]
    assert mapped.details["venue_code"] == -2010
    assert mapped.details["symbol"] == "BTC/USDT"
    assert mapped.details["operation"] == "create_order"


def test_binance_minus_1021_is_clock_skew_even_when_ccxt_says_bad_request() -> None:
    exc = ccxt.BadRequest('binance {"code":-1021,"msg":"Timestamp for this request is outside of the recvWindow."}')
    mapped = map_ccxt_error(exc, exchange_id="binance")
    assert isinstance(mapped, ClockSkewError)
    assert mapped.retryable


def test_secrets_are_scrubbed_from_urls_and_messages() -> None:
    url = "https://api.binance.com/api/v3/order?symbol=BTCUSDT&timestamp=1&signature=deadbeefcafe0123&apiKey=AKIA123"
    exc = ccxt.ExchangeError(f"binance POST {url} 400 Bad Request {{}} key MYSECRETKEY")
    mapped = map_ccxt_error(exc, exchange_id="binance", secrets=("MYSECRETKEY",))
    assert "deadbeefcafe0123" not in mapped.message
    assert "AKIA123" not in mapped.message
    assert "MYSECRETKEY" not in mapped.message
    assert "signature=***" in mapped.message
    assert "symbol=BTCUSDT" in mapped.message
    assert scrub('{"X-MBX-APIKEY": "abcdef"}') == '{"X-MBX-APIKEY": "***"}'


def test_retry_after_from_headers() -> None:
    exc = ccxt.DDoSProtection('binance 429 Too Many Requests {"code":-1003,"msg":"Too many requests"}')
    mapped = map_ccxt_error(exc, exchange_id="binance", headers={"Retry-After": "7"})
    assert isinstance(mapped, RateLimitError)
    assert mapped.retry_after == 7.0
    banned = map_ccxt_error(ccxt.DDoSProtection("binance 418 I'm a teapot {}"), headers={"retry-after": "120"})
    assert isinstance(banned, RateLimitError)
    assert banned.reason == "ip_banned"
    assert banned.retry_after == 120.0
    assert map_ccxt_error(ccxt.RateLimitExceeded("x")).retry_after is None  # type: ignore[attr-defined]


def test_parse_retry_after_http_date() -> None:
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after({"Retry-After": "Thu, 01 Jan 2026 00:00:30 GMT"}, now=now) == 30.0
    assert parse_retry_after({"Retry-After": "garbage"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after(None) is None


def test_raw_network_errors_are_mapped() -> None:
    assert isinstance(map_ccxt_error(TimeoutError()), RequestTimeoutError)
    assert map_ccxt_error(ConnectionResetError()).retryable


class _FakeExchange:
    def __init__(self) -> None:
        self.id = "binance"
        setattr(self, "apiKey", "APIKEY-VALUE-123")  # noqa: B010 - ccxt's attribute name
        self.secret = "SECRET-VALUE-456"
        self.last_response_headers = {"Retry-After": "3"}


def test_venue_call_context_manager_translates_and_chains() -> None:
    with pytest.raises(RateLimitError) as info, venue_call(_FakeExchange(), "fetch_order", symbol="BTC/USDT"):
        raise ccxt.RateLimitExceeded("binance 429 key=APIKEY-VALUE-123")
    assert info.value.retry_after == 3.0
    assert "APIKEY-VALUE-123" not in info.value.message
    assert isinstance(info.value.__cause__, ccxt.RateLimitExceeded)


def test_venue_call_leaves_programming_errors_and_meltica_errors_alone() -> None:
    with pytest.raises(KeyError), venue_call(_FakeExchange()):
        raise KeyError("bug")
    with pytest.raises(InvalidOrderError), venue_call(_FakeExchange()):
        raise InvalidOrderError("ours")


def test_venue_errors_decorator() -> None:
    class Holder:
        exchange = _FakeExchange()

        @venue_errors("cancel_order")
        async def cancel(self) -> None:
            raise ccxt.OrderNotFound('binance {"code":-2011,"msg":"Unknown order sent."}')

    with pytest.raises(OrderNotFoundError) as info:
        asyncio.run(Holder().cancel())
    assert info.value.details["operation"] == "cancel_order"
