"""Secret references in configuration, resolved to masked values only when needed.

A configured secret is a *reference*:

* ``env:NAME`` — read from environment variable ``NAME`` at resolution time;
* ``encrypted:<token>`` — a Fernet token, decrypted with the master key (see :mod:`meltica.secrets.master_key`).

Resolved values are ``Secret`` (a pydantic ``SecretStr``): ``str``/``repr`` show ``****``, JSON
serialisation too. Error messages name the reference kind or variable, never the secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import SecretStr

from meltica.errors import SecretError
from meltica.secrets.master_key import MasterKey

ENV_PREFIX = "env:"
ENCRYPTED_PREFIX = "encrypted:"
MASK = "****"


class Secret(SecretStr):
    """A string that never shows itself: ``str``, ``repr`` and JSON give ``****``."""

    def _display(self) -> str:
        return MASK


def plain_text(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _master(key: bytes | str | MasterKey | None, environ: Mapping[str, str] | None) -> MasterKey:
    if isinstance(key, MasterKey):
        return key
    if key is None:
        return MasterKey.load(environ)
    return MasterKey(key)


def encrypt_secret(
    plain: str | SecretStr,
    *,
    key: bytes | str | MasterKey | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """``"encrypted:<token>"`` for ``plain``, ready to paste into a config file."""
    value = plain_text(plain)
    if not value:
        raise SecretError("refusing to encrypt an empty secret", reason="secret_empty")
    return ENCRYPTED_PREFIX + _master(key, environ).encrypt(value).decode("ascii")


def is_secret_reference(value: str | SecretStr | None) -> bool:
    """True for ``env:NAME`` / ``encrypted:<token>``; False for plain text (or nothing)."""
    if value is None:
        return False
    text = plain_text(value)
    return (text.startswith(ENV_PREFIX) and len(text) > len(ENV_PREFIX)) or (
        text.startswith(ENCRYPTED_PREFIX) and len(text) > len(ENCRYPTED_PREFIX)
    )


def describe_secret(value: str | SecretStr | None) -> str | None:
    """Safe display of a configured secret: ``env:NAME`` stays (it is only a name), an encrypted
    token becomes ``encrypted:****``, plain text becomes ``****``."""
    if value is None:
        return None
    text = plain_text(value)
    if text.startswith(ENV_PREFIX) and is_secret_reference(text):
        return text
    if text.startswith(ENCRYPTED_PREFIX):
        return ENCRYPTED_PREFIX + MASK
    return MASK


def resolve_secret(
    ref: str | SecretStr,
    *,
    allow_plaintext: bool = False,
    key: bytes | str | MasterKey | None = None,
    environ: Mapping[str, str] | None = None,
) -> Secret:
    """The secret a reference points to, as a masked ``Secret``.

    Plain text (not a reference) is refused unless ``allow_plaintext`` — dev and paper configs may
    carry testnet keys inline; prod configuration refuses them before this is ever called.
    """
    text = plain_text(ref)
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
        token = text[len(ENCRYPTED_PREFIX) :]
        return Secret(_master(key, environ).decrypt(token, what="an encrypted secret"))
    if allow_plaintext:
        return Secret(text)
    raise SecretError(
        "secret is given as plain text; use env:NAME or encrypted:<token> (meltica config encrypt)",
        reason="secret_plaintext",
    )
