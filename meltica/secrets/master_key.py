"""The master key that encrypts credentials at rest, and the cipher built on it.

Where the key comes from, first match wins:

1. ``MELTICA_MASTER_KEY`` — the key itself (urlsafe base64 of 32 bytes, as ``meltica config generate-key``
   prints);
2. ``MELTICA_MASTER_KEY_FILE`` — a file holding the key; it must be readable by its owner only (mode 0600 or
   stricter), a file that group or others may access is refused;
3. the OS keyring (optional extra ``meltica[keyring]``): service ``meltica``, user ``master-key``. Set
   ``MELTICA_MASTER_KEY_KEYRING=off`` to skip it.

The cipher is Fernet (AES-128-CBC + HMAC-SHA256, authenticated, with a version byte and a timestamp in every
token). Tokens written by earlier releases (``encrypted:<token>`` references) stay readable because the format
did not change. Nothing here ever puts a key or a plain value into a message.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from cryptography.fernet import Fernet, InvalidToken

from meltica.errors import SecretError

MASTER_KEY_ENV = "MELTICA_MASTER_KEY"
MASTER_KEY_FILE_ENV = "MELTICA_MASTER_KEY_FILE"
NEW_MASTER_KEY_ENV = "MELTICA_NEW_MASTER_KEY"
KEYRING_SWITCH_ENV = "MELTICA_MASTER_KEY_KEYRING"
KEYRING_SERVICE = "meltica"
KEYRING_USERNAME = "master-key"

logger = logging.getLogger(__name__)

_OFF = {"0", "off", "false", "no"}


def generate_master_key() -> str:
    """A fresh Fernet master key (urlsafe base64 text), for ``MELTICA_MASTER_KEY``."""
    return Fernet.generate_key().decode("ascii")


class MasterKey:
    """A loaded, validated master key. It shows only where it came from, never itself, and cannot be pickled."""

    __slots__ = ("_fernet", "source")

    def __init__(self, key: bytes | str, *, source: str = "master key") -> None:
        raw = key.strip().encode("ascii", "replace") if isinstance(key, str) else key.strip()
        self.source = source
        try:
            self._fernet = Fernet(raw)
        except (ValueError, TypeError):
            # The message deliberately omits the key.
            raise SecretError(
                f"{source} is not a valid Fernet key (32 bytes, urlsafe base64)", reason="master_key_invalid"
            ) from None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> MasterKey:
        """The configured master key (environment, key file, then keyring)."""
        key, source = _find_master_key(environ)
        return cls(key, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> MasterKey:
        """A master key read from ``path`` (which must be 0600 or stricter)."""
        return cls(_read_key_file(Path(path)), source=f"key file {path}")

    def encrypt(self, plain: str) -> bytes:
        """The Fernet token (ASCII bytes) for ``plain``."""
        return self._fernet.encrypt(plain.encode("utf-8"))

    def decrypt(self, token: bytes | str, *, what: str = "an encrypted secret") -> str:
        """The plain text of ``token``; ``SecretError`` (no cause, no token) when the key does not fit."""
        data = token.encode("ascii", "replace") if isinstance(token, str) else bytes(token)
        try:
            return self._fernet.decrypt(data).decode("utf-8")
        except (InvalidToken, UnicodeDecodeError):
            pass
        _undecryptable(what)

    def fits(self, token: bytes) -> bool:
        """True when this key decrypts ``token``."""
        try:
            self._fernet.decrypt(token)
        except InvalidToken:
            return False
        return True

    def same_as(self, other: MasterKey) -> bool:
        """True when ``other`` is this very key (it decrypts what this one encrypts)."""
        return other.fits(self.encrypt("meltica-master-key-probe"))

    def __repr__(self) -> str:
        return f"MasterKey(source={self.source!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a MasterKey cannot be pickled")


def _undecryptable(what: str) -> NoReturn:
    # Raised outside the except block so neither the token nor cryptography's exception travels along.
    raise SecretError(f"cannot decrypt {what}: wrong master key or corrupted token", reason="secret_undecryptable")


def load_master_key(environ: Mapping[str, str] | None = None) -> bytes:
    """The master key bytes from ``MELTICA_MASTER_KEY``, ``MELTICA_MASTER_KEY_FILE`` or the OS keyring."""
    key, source = _find_master_key(environ)
    MasterKey(key, source=source)  # fail early on a malformed key
    return key.strip()


def _find_master_key(environ: Mapping[str, str] | None) -> tuple[bytes, str]:
    env = os.environ if environ is None else environ
    key = env.get(MASTER_KEY_ENV, "").strip()
    if key:
        return key.encode("ascii", "replace"), MASTER_KEY_ENV
    path = env.get(MASTER_KEY_FILE_ENV, "").strip()
    if path:
        return _read_key_file(Path(path)), f"{MASTER_KEY_FILE_ENV} ({path})"
    if env.get(KEYRING_SWITCH_ENV, "").strip().lower() not in _OFF:
        from_keyring = read_master_key_from_keyring()
        if from_keyring is not None:
            return from_keyring.encode("ascii", "replace"), f"keyring (service {KEYRING_SERVICE!r})"
    raise SecretError(
        f"no master key: set {MASTER_KEY_ENV} or {MASTER_KEY_FILE_ENV}, or store one in the OS keyring "
        f"(service {KEYRING_SERVICE!r}, user {KEYRING_USERNAME!r}) to encrypt or decrypt secrets",
        reason="master_key_missing",
    )


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
    except OSError as exc:
        raise SecretError(f"cannot read master key file {path}: {exc.strerror}", reason="master_key_missing") from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"master key file {path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"restrict it to its owner: chmod 600 {path}",
            reason="master_key_file_insecure",
        )
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read master key file {path}: {exc.strerror}", reason="master_key_missing") from None


def read_master_key_from_keyring() -> str | None:
    """The master key stored in the OS keyring, or None (no ``keyring`` package, no backend, no entry)."""
    try:
        # lazy: keyring is an optional extra (meltica[keyring])
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
        value = backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)
    except (KeyringError, RuntimeError) as exc:
        logger.debug("keyring unavailable for the master key: %s", type(exc).__name__)
        return None
    if value and "plaintext" in type(backend).__name__.lower():
        logger.warning(
            "master key read from an unencrypted keyring backend (%s); prefer a 0600 key file or a system keyring",
            type(backend).__name__,
        )
    return value or None


def store_master_key_in_keyring(key: bytes | str) -> None:
    """Store ``key`` in the OS keyring (service ``meltica``); needs the ``keyring`` extra."""
    text = key.decode("ascii") if isinstance(key, bytes) else key
    MasterKey(text, source="key for the keyring")  # validate before storing
    try:
        # lazy: keyring is an optional extra (meltica[keyring])
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        raise SecretError(
            "the keyring package is not installed (pip install 'meltica[keyring]')", reason="keyring_missing"
        ) from None
    try:
        keyring.set_password(KEYRING_SERVICE, KEYRING_USERNAME, text.strip())
    except (KeyringError, RuntimeError) as exc:
        raise SecretError(f"cannot store the master key in the keyring: {type(exc).__name__}") from None
