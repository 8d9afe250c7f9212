"""Credentials in HashiCorp Vault's KV version 2 secrets engine (optional extra ``meltica[vault]``).

One Vault secret per account at ``<mount>/data/<prefix>/<account>``. Vault encrypts its storage itself, so the
values are written as they are, without the Meltica master key; the Vault token decides who may read them.
The KV v2 calls used: read a secret version, create/update a secret, list secret names and delete the
metadata with all versions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from meltica.errors import SecretError
from meltica.secrets.credentials import CredentialInfo, Credentials, CredentialsNotFoundError
from meltica.secrets.redaction import register_secret

logger = logging.getLogger(__name__)

VAULT_ADDR_ENV = "VAULT_ADDR"
VAULT_TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 (a variable name)
DEFAULT_MOUNT_POINT = "secret"
DEFAULT_PREFIX = "meltica/credentials"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class VaultCredentialStore:
    """A :class:`~meltica.secrets.credentials.CredentialStore` over Vault KV v2 (through ``hvac``)."""

    def __init__(
        self,
        client: Any,
        *,
        mount_point: str = DEFAULT_MOUNT_POINT,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._client = client
        self._kv = client.secrets.kv.v2
        self._mount = mount_point
        self._prefix = prefix.strip("/")
        self._clock = clock

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> VaultCredentialStore:
        """A store on the Vault at ``VAULT_ADDR`` with ``VAULT_TOKEN``."""
        env = os.environ if environ is None else environ
        hvac = _import_hvac()
        url = env.get(VAULT_ADDR_ENV, "").strip()
        token = env.get(VAULT_TOKEN_ENV, "").strip()
        if not url or not token:
            raise SecretError(
                f"the Vault credential store needs {VAULT_ADDR_ENV} and {VAULT_TOKEN_ENV}", reason="vault_unconfigured"
            )
        return cls(hvac.Client(url=url, token=token), **kwargs)

    def _path(self, account: str) -> str:
        if not account or "/" in account or account in (".", ".."):
            raise SecretError(f"invalid account name {account!r} for Vault", reason="account_invalid")
        return f"{self._prefix}/{account}" if self._prefix else account

    def _read(self, account: str) -> dict[str, Any] | None:
        hvac = _import_hvac()
        try:
            response = self._kv.read_secret_version(
                path=self._path(account), mount_point=self._mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
        except _errors(hvac) as exc:
            raise _vault_error("read", account, exc) from None
        data: dict[str, Any] = response["data"]["data"]
        return data

    def put(self, account: str, exchange: str, credentials: Credentials) -> None:
        hvac = _import_hvac()
        existing = self._read(account)
        now = self._clock().isoformat()
        data = {
            "exchange": exchange,
            "api_key": credentials.api_key.get_secret_value(),
            "api_secret": credentials.api_secret.get_secret_value(),
            "passphrase": credentials.passphrase.get_secret_value() if credentials.passphrase else None,
            "key_fingerprint": credentials.fingerprint,
            "created_at": existing.get("created_at", now) if existing else now,
            "rotated_at": now if existing else None,
        }
        try:
            self._kv.create_or_update_secret(path=self._path(account), secret=data, mount_point=self._mount)
        except _errors(hvac) as exc:
            raise _vault_error("write", account, exc) from None
        logger.info(
            "stored credentials for account %s in Vault (%s, key %s)", account, exchange, data["key_fingerprint"]
        )

    def get(self, account: str) -> Credentials:
        data = self._read(account)
        if data is None:
            raise CredentialsNotFoundError(f"no credentials stored in Vault for account {account}", account=account)
        register_secret(data.get("api_key"), data.get("api_secret"), data.get("passphrase"))
        try:
            return Credentials.of(str(data["api_key"]), str(data["api_secret"]), data.get("passphrase"))
        except (KeyError, ValueError):
            raise SecretError(
                f"the Vault secret of account {account} is not a Meltica credential", reason="vault_malformed"
            ) from None

    def list(self) -> list[CredentialInfo]:
        hvac = _import_hvac()
        try:
            response = self._kv.list_secrets(path=self._prefix, mount_point=self._mount)
        except hvac.exceptions.InvalidPath:
            return []
        except _errors(hvac) as exc:
            raise _vault_error("list", self._prefix, exc) from None
        infos = []
        for name in sorted(response["data"]["keys"]):
            if name.endswith("/"):
                continue  # a sub-folder, not an account
            data = self._read(name)
            if data is None:
                continue
            infos.append(
                CredentialInfo(
                    account=name,
                    exchange=str(data.get("exchange", "")),
                    key_fingerprint=str(data.get("key_fingerprint", "")),
                    created_at=datetime.fromisoformat(str(data["created_at"])),
                    rotated_at=datetime.fromisoformat(str(data["rotated_at"])) if data.get("rotated_at") else None,
                )
            )
        return infos

    def remove(self, account: str) -> None:
        hvac = _import_hvac()
        if self._read(account) is None:
            raise CredentialsNotFoundError(f"no credentials stored in Vault for account {account}", account=account)
        try:
            self._kv.delete_metadata_and_all_versions(path=self._path(account), mount_point=self._mount)
        except _errors(hvac) as exc:
            raise _vault_error("delete", account, exc) from None
        logger.info("removed credentials of account %s from Vault", account)


def _vault_error(action: str, account: str, exc: Exception) -> SecretError:
    # hvac's messages carry Vault's error list (no secret values); the request body is not included.
    return SecretError(f"Vault could not {action} credentials of {account}: {type(exc).__name__}", reason="vault_error")


def _errors(hvac: Any) -> tuple[type[Exception], ...]:
    # lazy: hvac (and its requests) is an optional extra (meltica[vault])
    import requests

    return (hvac.exceptions.VaultError, requests.RequestException)


def _import_hvac() -> Any:
    try:
        # lazy: hvac (and its requests) is an optional extra (meltica[vault])
        import hvac  # type: ignore[import-untyped]
        import hvac.exceptions  # type: ignore[import-untyped]
    except ImportError:
        raise SecretError(
            "the hvac package is not installed (pip install 'meltica[vault]')", reason="vault_missing"
        ) from None
    return hvac
