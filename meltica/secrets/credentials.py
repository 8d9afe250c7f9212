"""Exchange API credentials and the protocol every credential store implements."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import NoReturn, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, field_validator

from meltica.errors import SecretError
from meltica.secrets.references import Secret

FINGERPRINT_LENGTH = 12


class CredentialsNotFoundError(SecretError):
    """No credentials are stored for an account."""

    default_reason = "credentials_not_found"


def key_fingerprint(api_key: str | Secret) -> str:
    """A short SHA-256 prefix of the API key: tells keys apart in listings without showing them."""
    text = api_key.get_secret_value() if isinstance(api_key, Secret) else api_key
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


class Credentials(BaseModel):
    """An exchange API key, its secret and (OKX, KuCoin, …) passphrase.

    Every field is a :class:`Secret`: ``repr``, ``str`` and JSON show ``****``. Pickling is refused, so a
    credential cannot travel to another process or a cache by accident.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    api_key: Secret
    api_secret: Secret
    passphrase: Secret | None = None

    @field_validator("api_key", "api_secret")
    @classmethod
    def _not_empty(cls, value: Secret) -> Secret:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("passphrase")
    @classmethod
    def _empty_means_none(cls, value: Secret | None) -> Secret | None:
        return None if value is not None and not value.get_secret_value() else value

    @classmethod
    def of(cls, api_key: str, api_secret: str, passphrase: str | None = None) -> Credentials:
        """Credentials from plain strings (an empty passphrase means none)."""
        return cls(
            api_key=Secret(api_key),
            api_secret=Secret(api_secret),
            passphrase=Secret(passphrase) if passphrase else None,
        )

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.api_key)

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("Credentials cannot be pickled (they would leave the process in plain text)")


class CredentialInfo(BaseModel):
    """What a listing shows about stored credentials: never the credentials themselves."""

    model_config = ConfigDict(frozen=True)

    account: str
    exchange: str
    key_fingerprint: str
    created_at: datetime
    rotated_at: datetime | None = None


@runtime_checkable
class CredentialStore(Protocol):
    """Where exchange credentials live, encrypted at rest."""

    def put(self, account: str, exchange: str, credentials: Credentials) -> None:
        """Store (or replace) the credentials of ``account``."""
        ...

    def get(self, account: str) -> Credentials:
        """The credentials of ``account``; :class:`CredentialsNotFoundError` when there are none."""
        ...

    def list(self) -> list[CredentialInfo]:
        """Every stored account, by account name: fingerprints only."""
        ...

    def remove(self, account: str) -> None:
        """Delete the credentials of ``account``; :class:`CredentialsNotFoundError` when there are none."""
        ...
