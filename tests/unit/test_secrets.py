from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from meltica.config import AccountConfig, MelticaSettings
from meltica.errors import SecretError
from meltica.secrets import (
    MASK,
    Secret,
    describe_secret,
    encrypt_secret,
    generate_master_key,
    is_secret_reference,
    load_master_key,
    resolve_secret,
)

PLAIN = "s3cr3t-API-value-that-must-not-leak"


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = generate_master_key()
    monkeypatch.setenv("MELTICA_MASTER_KEY", key)
    monkeypatch.delenv("MELTICA_MASTER_KEY_FILE", raising=False)
    return key


def test_encrypt_resolve_round_trip(master_key: str) -> None:
    ref = encrypt_secret(PLAIN)
    assert ref.startswith("encrypted:")
    assert PLAIN not in ref
    secret = resolve_secret(ref)
    assert isinstance(secret, Secret)
    assert secret.get_secret_value() == PLAIN
    assert str(secret) == MASK
    assert PLAIN not in repr(secret)


def test_master_key_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key()
    path = tmp_path / "master.key"
    path.write_bytes(key + b"\n")
    path.chmod(0o600)  # a key file others may read is refused
    monkeypatch.delenv("MELTICA_MASTER_KEY", raising=False)
    monkeypatch.setenv("MELTICA_MASTER_KEY_FILE", str(path))
    assert load_master_key() == key
    assert resolve_secret(encrypt_secret(PLAIN)).get_secret_value() == PLAIN


def test_missing_and_bad_master_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MELTICA_MASTER_KEY", raising=False)
    monkeypatch.delenv("MELTICA_MASTER_KEY_FILE", raising=False)
    monkeypatch.setenv("MELTICA_MASTER_KEY_KEYRING", "off")  # whatever the machine's keyring holds
    with pytest.raises(SecretError, match="no master key"):
        encrypt_secret(PLAIN)
    monkeypatch.setenv("MELTICA_MASTER_KEY", "not-a-key")
    with pytest.raises(SecretError, match="not a valid Fernet key") as info:
        load_master_key()
    assert "not-a-key" not in str(info.value)
    monkeypatch.delenv("MELTICA_MASTER_KEY")
    monkeypatch.setenv("MELTICA_MASTER_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(SecretError, match="cannot read master key file"):
        load_master_key()


def test_wrong_key_error_does_not_leak(master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = encrypt_secret(PLAIN)
    monkeypatch.setenv("MELTICA_MASTER_KEY", generate_master_key())
    with pytest.raises(SecretError, match="wrong master key") as info:
        resolve_secret(ref)
    rendered = "".join(traceback.format_exception(info.value))
    assert PLAIN not in rendered
    assert ref.split(":", 1)[1] not in rendered
    assert info.value.__cause__ is None


def test_env_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_BINANCE_KEY", PLAIN)
    assert resolve_secret("env:TEST_BINANCE_KEY").get_secret_value() == PLAIN
    with pytest.raises(SecretError, match=r"TEST_ABSENT_KEY .* is not set"):
        resolve_secret("env:TEST_ABSENT_KEY")
    with pytest.raises(SecretError, match="names no variable"):
        resolve_secret("env:")


def test_plaintext_refused_unless_allowed() -> None:
    with pytest.raises(SecretError, match="plain text") as info:
        resolve_secret(PLAIN)
    assert PLAIN not in str(info.value)
    assert resolve_secret(PLAIN, allow_plaintext=True).get_secret_value() == PLAIN


def test_reference_helpers() -> None:
    assert is_secret_reference("env:X")
    assert is_secret_reference(Secret("encrypted:abc"))
    assert not is_secret_reference(PLAIN)
    assert not is_secret_reference("env:")
    assert describe_secret("env:X") == "env:X"
    assert describe_secret("encrypted:gAAAA") == "encrypted:****"
    assert describe_secret(PLAIN) == MASK


def test_settings_holding_a_secret_never_show_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MELTICA_ACCOUNTS", raising=False)
    settings = MelticaSettings(
        accounts=[AccountConfig(name="a", exchange="binance", api_key=PLAIN, api_secret=PLAIN)],
        database_url=f"postgresql://u:{PLAIN}@db/meltica",
    )
    assert settings.accounts[0].credential("api_key", allow_plaintext=True).get_secret_value() == PLAIN  # type: ignore[union-attr]
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump(mode="json"))):
        assert PLAIN not in text

    def explode(config: MelticaSettings) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError) as info:
        explode(settings)
    rendered = "".join(traceback.TracebackException.from_exception(info.value, capture_locals=True).format())
    assert "boom" in rendered
    assert PLAIN not in rendered


def test_validation_error_hides_secret_input() -> None:
    with pytest.raises(ValueError, match="accounts") as info:
        MelticaSettings(accounts=[{"name": "a", "exchange": "binance", "api_key": PLAIN, "bogus": PLAIN}])
    assert PLAIN not in str(info.value)
