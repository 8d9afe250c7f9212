from __future__ import annotations

import pytest

from meltica import errors
from meltica.errors import (
    ConfigurationError,
    DataValidationError,
    IllegalStateTransitionError,
    MelticaError,
    RateLimitError,
    RetryableError,
    SecretError,
    TerminalError,
    is_retryable,
)


@pytest.mark.parametrize(
    "cls",
    [
        errors.NetworkError,
        errors.RequestTimeoutError,
        RateLimitError,
        errors.ExchangeUnavailableError,
        errors.InfrastructureUnavailableError,
    ],
)
def test_retryable_family(cls: type[MelticaError]) -> None:
    error = cls("x")
    assert isinstance(error, RetryableError)
    assert is_retryable(error)


@pytest.mark.parametrize(
    "cls",
    [
        errors.InvalidOrderError,
        errors.InsufficientFundsError,
        errors.AuthenticationError,
        errors.RiskRejectedError,
        ConfigurationError,
        DataValidationError,
        IllegalStateTransitionError,
        SecretError,
        errors.OrderNotFoundError,
    ],
)
def test_terminal_family(cls: type[MelticaError]) -> None:
    error = cls("x")
    assert isinstance(error, TerminalError)
    assert not is_retryable(error)
    assert error.reason == cls.default_reason


def test_structured_details() -> None:
    error = ConfigurationError("f: risk.x: bad", source="f", field="risk.x", problems=[["f", "risk.x", "bad"]])
    assert (error.source, error.field, str(error)) == ("f", "risk.x", "f: risk.x: bad")
    assert error.details["field"] == "risk.x"
    limited = RateLimitError("slow down", retry_after=1.5)
    assert limited.retry_after == 1.5
    assert limited.reason == "rate_limited"
    assert not is_retryable(ValueError("plain"))
    assert IllegalStateTransitionError("x", reason="overfill").reason == "overfill"
