"""Credentials, the master key's sources (0600 key file, OS keyring) and log redaction — no database."""

from __future__ import annotations

import json
import logging
import pickle
import traceback
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from cryptography.fernet import Fernet
from keyring.backend import KeyringBackend
from keyrings.alt.file import PlaintextKeyring  # type: ignore[import-untyped]

from meltica.errors import SecretError
from meltica.secrets import (
    Credentials,
    MasterKey,
    RedactingFilter,
    encrypt_secret,
    generate_master_key,
    install_log_redaction,
    key_fingerprint,
    load_master_key,
    read_master_key_from_keyring,
    redaction,
    register_secret,
    resolve_secret,
    store_master_key_in_keyring,
)

KNOWN_SECRET = "S3CRET-known-value-123"


# --- credentials ---------------------------------------------------------------------------------


def test_credentials_never_show_values() -> None:
    creds = Credentials.of("APIKEY-known-value-456", KNOWN_SECRET, "PASS-known-value-789")
    assert creds.api_secret.get_secret_value() == KNOWN_SECRET
    shown = [repr(creds), str(creds), f"{creds!r}", creds.model_dump_json(), json.dumps(creds.model_dump(mode="json"))]
    shown.append(str(creds.model_dump()))
    for text in shown:
        assert KNOWN_SECRET not in text
        assert "APIKEY-known-value-456" not in text
    assert set(creds.model_dump(mode="json")["api_secret"]) == {"*"}
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(creds)
    assert creds.fingerprint == key_fingerprint("APIKEY-known-value-456")
    assert len(creds.fingerprint) == 12
    assert "APIKEY" not in creds.fingerprint
    assert Credentials.of("k" * 8, "s" * 8, "").passphrase is None


def test_credentials_validation_hides_input() -> None:
    with pytest.raises(ValueError, match="api_key") as info:
        Credentials.of("   ", KNOWN_SECRET)
    assert KNOWN_SECRET not in str(info.value)


def test_master_key_never_shows_itself() -> None:
    text = generate_master_key()
    key = MasterKey(text, source="unit")
    assert text not in repr(key)
    assert text not in str(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(SecretError, match="not a valid Fernet key") as info:
        MasterKey("short-bogus-key")
    assert "short-bogus-key" not in str(info.value)


def test_tokens_of_the_earlier_format_still_decrypt() -> None:
    raw = Fernet.generate_key()
    legacy = "encrypted:" + Fernet(raw).encrypt(KNOWN_SECRET.encode()).decode()
    assert resolve_secret(legacy, key=raw).get_secret_value() == KNOWN_SECRET
    assert resolve_secret(legacy, key=MasterKey(raw)).get_secret_value() == KNOWN_SECRET
    with pytest.raises(SecretError, match="cannot decrypt an encrypted secret: wrong master key") as info:
        resolve_secret(legacy, key=generate_master_key())
    assert info.value.__context__ is None
    assert KNOWN_SECRET not in "".join(traceback.format_exception(info.value))


# --- the key file --------------------------------------------------------------------------------


def test_key_file_must_be_owner_only(tmp_path: Path) -> None:
    key = generate_master_key()
    path = tmp_path / "master.key"
    path.write_text(key + "\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(SecretError, match=r"accessible by group or others .* chmod 600") as info:
            load_master_key({"MELTICA_MASTER_KEY_FILE": str(path)})
        assert info.value.reason == "master_key_file_insecure"
        assert key not in str(info.value)
    for mode in (0o600, 0o400):
        path.chmod(mode)
        assert load_master_key({"MELTICA_MASTER_KEY_FILE": str(path)}) == key.encode()
        assert MasterKey.from_file(path).source == f"key file {path}"


def test_environment_key_wins_over_file(tmp_path: Path) -> None:
    env_key, file_key = generate_master_key(), generate_master_key()
    path = tmp_path / "k"
    path.write_text(file_key)
    path.chmod(0o600)
    assert load_master_key({"MELTICA_MASTER_KEY": env_key, "MELTICA_MASTER_KEY_FILE": str(path)}) == env_key.encode()


# --- the OS keyring ------------------------------------------------------------------------------


class MemoryKeyring(KeyringBackend):
    """A real keyring backend (subclass of keyring's base class) holding passwords in a dict."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.passwords: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.passwords.pop((service, username), None)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


def test_master_key_from_keyring(memory_keyring: MemoryKeyring) -> None:
    assert read_master_key_from_keyring() is None
    with pytest.raises(SecretError, match="no master key"):
        load_master_key({})
    key = generate_master_key()
    store_master_key_in_keyring(key)
    assert memory_keyring.passwords[("meltica", "master-key")] == key
    assert load_master_key({}) == key.encode()
    assert MasterKey.load({}).source == "keyring (service 'meltica')"
    ref = encrypt_secret(KNOWN_SECRET, environ={})
    assert resolve_secret(ref, environ={}).get_secret_value() == KNOWN_SECRET
    # the environment still wins, and the keyring can be switched off
    other = generate_master_key()
    assert load_master_key({"MELTICA_MASTER_KEY": other}) == other.encode()
    with pytest.raises(SecretError, match="no master key"):
        load_master_key({"MELTICA_MASTER_KEY_KEYRING": "off"})
    with pytest.raises(SecretError, match="not a valid Fernet key"):
        store_master_key_in_keyring("not-a-key")


def test_master_key_from_file_keyring_backend(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """keyrings.alt's plaintext file backend, as a real keyring would be used; it warns that it is unencrypted."""
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring_pass.cfg")
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    try:
        key = generate_master_key()
        store_master_key_in_keyring(key)
        assert (tmp_path / "keyring_pass.cfg").exists()
        with caplog.at_level(logging.WARNING):
            assert MasterKey.load({}).decrypt(MasterKey(key).encrypt(KNOWN_SECRET)) == KNOWN_SECRET
        assert "unencrypted keyring backend" in caplog.text
        assert key not in caplog.text
    finally:
        keyring.set_keyring(previous)


# --- log redaction -------------------------------------------------------------------------------


@pytest.fixture
def clean_redaction() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    redaction.registry.clear()
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        redaction._installed_factory = None
        redaction.registry.clear()
        for handler in logging.getLogger().handlers:
            for existing in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
                handler.removeFilter(existing)


@pytest.mark.usefixtures("clean_redaction")
def test_redacting_filter_scrubs_registered_values() -> None:
    register_secret(KNOWN_SECRET, "abc", None)  # "abc" is too short to mask
    assert len(redaction.registry) == 1
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "signed with %s and %d", (KNOWN_SECRET, 3), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "signed with **** and 3"
    assert redaction.redact(f"{KNOWN_SECRET}/{KNOWN_SECRET}") == "****/****"
    assert KNOWN_SECRET not in repr(redaction.registry)


@pytest.mark.usefixtures("clean_redaction")
def test_install_log_redaction_covers_every_logger(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    install_log_redaction()  # idempotent
    register_secret(KNOWN_SECRET)
    log = logging.getLogger("meltica.adapters.some_exchange")
    with caplog.at_level(logging.DEBUG):
        log.info("request signed with secret=%s", KNOWN_SECRET)
        log.debug(f"f-string with {KNOWN_SECRET}")
        try:
            raise ValueError(f"exchange rejected {KNOWN_SECRET}")
        except ValueError:
            log.exception("call failed")
        log.warning("stack", stack_info=True)
    assert "secret=****" in caplog.text
    assert "exchange rejected ****" in caplog.text
    assert KNOWN_SECRET not in caplog.text
    for record in caplog.records:
        assert KNOWN_SECRET not in record.getMessage()
        assert KNOWN_SECRET not in (record.exc_text or "")
