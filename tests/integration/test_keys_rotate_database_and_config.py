"""`meltica keys rotate-master` against the real PostgreSQL: the stored credentials and the `encrypted:` tokens of
configuration files move to the new key together, or neither moves."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from meltica.cli import app
from meltica.config import load_settings
from meltica.errors import SecretError
from meltica.secrets import (
    Credentials,
    DatabaseCredentialStore,
    MasterKey,
    encrypt_secret,
    generate_master_key,
    resolve_secret,
)

pytestmark = pytest.mark.integration

STORED_KEY = "APIKEY-stored-known-444"
STORED_SECRET = "S3CRET-stored-known-555"
FILE_SECRET = "S3CRET-file-known-666"
PLAINS = (STORED_KEY, STORED_SECRET, FILE_SECRET)

CONFIG = """\
environment: paper
trading_mode: paper
symbols: [BTC/USDT]
accounts:
  - name: main
    exchange: binance
    sandbox: true
  - name: second
    exchange: binance
    sandbox: true
    api_key: env:SECOND_KEY
    api_secret: {token}
"""


def cli_env(engine: Engine, old: str, new: str) -> dict[str, str]:
    return {
        "MELTICA_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "MELTICA_MASTER_KEY": old,
        "MELTICA_MASTER_KEY_FILE": "",
        "MELTICA_MASTER_KEY_KEYRING": "off",
        "MELTICA_NEW_MASTER_KEY": new,
        "MELTICA_ENV": "",
    }


def ciphertexts(engine: Engine) -> list[tuple[str, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT account, api_secret_ciphertext FROM credentials ORDER BY account")).all()
    return [(account, bytes(cipher)) for account, cipher in rows]


def invoke(config: Path, env: dict[str, str], *more: str):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["keys", "rotate-master", "--config", str(config), *more], env=env)
    for plain in PLAINS:
        assert plain not in result.output
    return result


def test_database_and_configuration_move_to_the_new_key_together(fresh_database: Engine, tmp_path: Path) -> None:
    old, new = generate_master_key(), generate_master_key()
    DatabaseCredentialStore(fresh_database, MasterKey(old)).put(
        "main", "binance", Credentials.of(STORED_KEY, STORED_SECRET)
    )
    config = tmp_path / "paper.yaml"
    config.write_text(CONFIG.format(token=encrypt_secret(FILE_SECRET, key=old)))
    before = ciphertexts(fresh_database), config.read_bytes()

    dry = invoke(config, cli_env(fresh_database, old, new), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would re-encrypt 1 credential(s) in the database" in dry.stdout
    assert (ciphertexts(fresh_database), config.read_bytes()) == before

    result = invoke(config, cli_env(fresh_database, old, new))

    assert result.exit_code == 0, result.output
    assert "re-encrypted 1 credential(s) in the database" in result.stdout
    assert f"{config}:12: accounts[1].api_secret: re-encrypted" in result.stdout
    stored = DatabaseCredentialStore(fresh_database, MasterKey(new)).get("main")
    assert stored.api_secret.get_secret_value() == STORED_SECRET
    account = load_settings(config_file=config).accounts[1]
    assert account.api_secret is not None
    assert resolve_secret(account.api_secret, key=new).get_secret_value() == FILE_SECRET


def test_undecryptable_file_token_leaves_the_database_alone(fresh_database: Engine, tmp_path: Path) -> None:
    old, new = generate_master_key(), generate_master_key()
    DatabaseCredentialStore(fresh_database, MasterKey(old)).put(
        "main", "binance", Credentials.of(STORED_KEY, STORED_SECRET)
    )
    before = ciphertexts(fresh_database)
    config = tmp_path / "paper.yaml"
    config.write_text(CONFIG.format(token=encrypt_secret(FILE_SECRET, key=generate_master_key())))
    config_before = config.read_bytes()

    result = invoke(config, cli_env(fresh_database, old, new))

    assert result.exit_code == 1
    assert f"{config}:12: accounts[1].api_secret: encrypted token cannot be decrypted" in result.stderr
    assert "nothing was changed" in result.stderr
    assert ciphertexts(fresh_database) == before
    assert config.read_bytes() == config_before


def test_failed_database_rotation_leaves_the_files_alone(fresh_database: Engine, tmp_path: Path) -> None:
    old, new = generate_master_key(), generate_master_key()
    # A row written under some other key: the database rotation fails and rolls back.
    DatabaseCredentialStore(fresh_database, MasterKey(generate_master_key())).put(
        "main", "binance", Credentials.of(STORED_KEY, STORED_SECRET)
    )
    config = tmp_path / "paper.yaml"
    config.write_text(CONFIG.format(token=encrypt_secret(FILE_SECRET, key=old)))
    config_before = config.read_bytes()

    result = invoke(config, cli_env(fresh_database, old, new))

    assert result.exit_code == 1
    assert "cannot decrypt the api_key of account main" in result.stderr
    assert "nothing was changed" in result.stderr
    assert config.read_bytes() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper.yaml"]  # the staged rewrite was removed
    account = load_settings(config_file=config).accounts[1]
    assert account.api_secret is not None
    assert resolve_secret(account.api_secret, key=old).get_secret_value() == FILE_SECRET
    with pytest.raises(SecretError):
        resolve_secret(account.api_secret, key=new)
