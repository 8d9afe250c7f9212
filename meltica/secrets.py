"""API credentials: references in configuration, resolved to masked values only when needed.

A configured secret is a *reference*:

* ``env:NAME`` — read from environment variable ``NAME`` at resolution time;
* ``encrypted:<token>`` — a Fernet token, decrypted with the master key from ``MELTICA_MASTER_KEY``
  (a urlsafe-base64 32-byte key) or from the file named by ``MELTICA_MASTER_KEY_FILE``.

Resolved values are ``Secret`` (a pydantic ``SecretStr``): ``str``/``repr`` show ``****``, JSON
serialisation too. Error messages name the reference kind or variable, never the secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from meltica.errors import SecretError

MASTER_KEY_ENV = "MELTICA_MASTER_KEY"
MASTER_KEY_FILE_ENV = "MELTICA_MASTER_KEY_FILE"
ENV_PREFIX = "env:"
ENCRYPTED_PREFIX = "encrypted:"
MASK = "****"


class Secret(SecretStr):
    """A string that never shows itself: ``str``, ``repr`` and JSON give ``****``."""

    def _display(self) -> str:
        return MASK


def generate_master_key() -> str:
    """A fresh Fernet master key (urlsafe base64 text), for ``MELTICA_MASTER_KEY``."""
    return Fernet.generate_key().decode("ascii")


def load_master_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The master key from ``MELTICA_MASTER_KEY`` or the file named by ``MELTICA_MASTER_KEY_FILE``."""
    env = os.environ if environ is None else environ
    key = env.get(MASTER_KEY_ENV, "").strip()
    source = MASTER_KEY_ENV
    if not key:
        path = env.get(MASTER_KEY_FILE_ENV, "").strip()
        if not path:
            raise SecretError(
                f"no master key: set {MASTER_KEY_ENV} or {MASTER_KEY_FILE_ENV} to decrypt secrets",
                reason="master_key_missing",
            )
        source = f"{MASTER_KEY_FILE_ENV} ({path})"
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(
                f"cannot read master key file {path}: {exc.strerror}", reason="master_key_missing"
            ) from None
    _fernet(key.encode("ascii", "replace"), source)  # fail early on a malformed key
    return key.encode("ascii")


def _fernet(key: bytes, source: str = "master key") -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        # The message deliberately omits the key.
        raise SecretError(
            f"{source} is not a valid Fernet key (32 bytes, urlsafe base64)", reason="master_key_invalid"
        ) from None


def _key_bytes(key: bytes | str | None, environ: Mapping[str, str] | None) -> bytes:
    if key is None:
        return load_master_key(environ)
    return key.encode("ascii") if isinstance(key, str) else key


def encrypt_secret(
    plain: str | SecretStr, *, key: bytes | str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """``"encrypted:<token>"`` for ``plain``, ready to paste into a config file."""
    value = plain.get_secret_value() if isinstance(plain, SecretStr) else plain
    if not value:
        raise SecretError("refusing to encrypt an empty secret", reason="secret_empty")
    token = _fernet(_key_bytes(key, environ)).encrypt(value.encode("utf-8"))
    return ENCRYPTED_PREFIX + token.decode("ascii")


def is_secret_reference(value: str | SecretStr | None) -> bool:
    """True for ``env:NAME`` / ``encrypted:<token>``; False for plain text (or nothing)."""
    if value is None:
        return False
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    return (text.startswith(ENV_PREFIX) and len(text) > len(ENV_PREFIX)) or (
        text.startswith(ENCRYPTED_PREFIX) and len(text) > len(ENCRYPTED_PREFIX)
    )


def describe_secret(value: str | SecretStr | None) -> str | None:
    """Safe display of a configured secret: ``env:NAME`` stays (it is only a name), an encrypted
    token becomes ``encrypted:****``, plain text becomes ``****``."""
    if value is None:
        return None
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if text.startswith(ENV_PREFIX) and is_secret_reference(text):
        return text
    if text.startswith(ENCRYPTED_PREFIX):
        return ENCRYPTED_PREFIX + MASK
    return MASK


def resolve_secret(
    ref: str | SecretStr,
    *,
    allow_plaintext: bool = False,
    key: bytes | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Secret:
    """The secret a reference points to, as a masked ``Secret``.

    Plain text (not a reference) is refused unless ``allow_plaintext`` — dev and paper configs may
    carry testnet keys inline; prod configuration refuses them before this is ever called.
    """
    text = ref.get_secret_value() if isinstance(ref, SecretStr) else ref
    env = os.environ if environ is None else environ
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX) :]
        if not name:
            raise SecretError("secret reference 'env:' names no variable", reason="secret_reference_invalid")
        value = env.get(name)
        if not value:
            raise SecretError(
                f"environment variable {name} named by a secret reference is not set",
                reason="secret_missing",
                variable=name,
            )
        return Secret(value)
    if text.startswith(ENCRYPTED_PREFIX):
        token = text[len(ENCRYPTED_PREFIX) :].encode("ascii", "replace")
        try:
            plain = _fernet(_key_bytes(key, environ)).decrypt(token)
        except InvalidToken:
            raise SecretError(
                "cannot decrypt an encrypted secret: wrong master key or corrupted token",
                reason="secret_undecryptable",
            ) from None
        return Secret(plain.decode("utf-8"))
    if allow_plaintext:
        return Secret(text)
    raise SecretError(
        "secret is given as plain text; use env:NAME or encrypted:<token> (meltica config encrypt)",
        reason="secret_plaintext",
    )
