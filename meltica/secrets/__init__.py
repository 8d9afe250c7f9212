"""Secrets: configuration references, the master key, encrypted exchange credentials and log redaction.

* :mod:`~meltica.secrets.references` — ``env:NAME`` / ``encrypted:<token>`` references and the masked ``Secret``;
* :mod:`~meltica.secrets.master_key` — the master key (environment, 0600 key file, OS keyring) and its cipher;
* :mod:`~meltica.secrets.credentials` — ``Credentials``, ``CredentialInfo`` and the ``CredentialStore`` protocol;
* :mod:`~meltica.secrets.database` — ``DatabaseCredentialStore`` (the ``credentials`` table) and master-key rotation;
* :mod:`~meltica.secrets.vault` — ``VaultCredentialStore`` (HashiCorp Vault KV v2, extra ``meltica[vault]``);
* :mod:`~meltica.secrets.redaction` — scrub registered secret values from log records.

The database and Vault stores are imported lazily (``from meltica.secrets import DatabaseCredentialStore``
works), so importing this package does not pull in SQLAlchemy tables or hvac.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meltica.secrets.credentials import (
    CredentialInfo,
    Credentials,
    CredentialsNotFoundError,
    CredentialStore,
    key_fingerprint,
)
from meltica.secrets.master_key import (
    KEYRING_SERVICE,
    KEYRING_USERNAME,
    MASTER_KEY_ENV,
    MASTER_KEY_FILE_ENV,
    NEW_MASTER_KEY_ENV,
    MasterKey,
    generate_master_key,
    load_master_key,
    read_master_key_from_keyring,
    store_master_key_in_keyring,
)
from meltica.secrets.redaction import (
    RedactingFilter,
    install_log_redaction,
    redact,
    register_secret,
    register_secrets,
)
from meltica.secrets.references import (
    ENCRYPTED_PREFIX,
    ENV_PREFIX,
    MASK,
    Secret,
    describe_secret,
    encrypt_secret,
    is_secret_reference,
    resolve_secret,
)

if TYPE_CHECKING:
    from meltica.secrets.database import DatabaseCredentialStore, rotate_master_key
    from meltica.secrets.vault import VaultCredentialStore

__all__ = [
    "ENCRYPTED_PREFIX",
    "ENV_PREFIX",
    "KEYRING_SERVICE",
    "KEYRING_USERNAME",
    "MASK",
    "MASTER_KEY_ENV",
    "MASTER_KEY_FILE_ENV",
    "NEW_MASTER_KEY_ENV",
    "CredentialInfo",
    "CredentialStore",
    "Credentials",
    "CredentialsNotFoundError",
    "DatabaseCredentialStore",
    "MasterKey",
    "RedactingFilter",
    "Secret",
    "VaultCredentialStore",
    "describe_secret",
    "encrypt_secret",
    "generate_master_key",
    "install_log_redaction",
    "is_secret_reference",
    "key_fingerprint",
    "load_master_key",
    "read_master_key_from_keyring",
    "redact",
    "register_secret",
    "register_secrets",
    "resolve_secret",
    "rotate_master_key",
    "store_master_key_in_keyring",
]

_LAZY = {
    "DatabaseCredentialStore": "meltica.secrets.database",
    "rotate_master_key": "meltica.secrets.database",
    "VaultCredentialStore": "meltica.secrets.vault",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meltica.secrets' has no attribute {name!r}")

    return getattr(importlib.import_module(module), name)
