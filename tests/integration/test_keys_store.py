"""Encrypted credentials in the real PostgreSQL: the store, `meltica keys` and master-key rotation.

The known secret must never show up in logs, reprs, exceptions, CLI output or the database (scanned as text,
and dumped with pg_dump when one that fits the server is installed).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from meltica.cli import app
from meltica.errors import SecretError
from meltica.secrets import (
    CredentialInfo,
    Credentials,
    CredentialsNotFoundError,
    CredentialStore,
    DatabaseCredentialStore,
    MasterKey,
    generate_master_key,
    key_fingerprint,
    rotate_master_key,
)
from meltica.storage import migrate
from meltica.storage.engine import make_engine
from tests.integration.databases import drop_test_database

pytestmark = pytest.mark.integration

KNOWN_SECRET = "S3CRET-known-value-123"
KNOWN_KEY = "APIKEY-known-value-456"
KNOWN_PASSPHRASE = "PASS-known-value-789"
PLAINS = (KNOWN_SECRET, KNOWN_KEY, KNOWN_PASSPHRASE)


def assert_clean(rendered: str) -> None:
    for plain in PLAINS:
        assert plain not in rendered


def _admin(url: str, sql: str) -> None:
    admin = make_engine(url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(sql))
    admin.dispose()


@pytest.fixture
def database(postgres_endpoint) -> Iterator[tuple[Engine, str]]:  # type: ignore[no-untyped-def]
    """A fresh migrated database per test (rotation tests must see only their own rows) and its URL."""
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    _admin(postgres_endpoint.url, f'CREATE DATABASE "{name}"')
    url = postgres_endpoint.url_for(name)
    engine = make_engine(url)
    migrate.upgrade(engine)
    try:
        yield engine, url
    finally:
        engine.dispose()
        admin = make_engine(postgres_endpoint.url)
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            drop_test_database(conn, name)
        admin.dispose()


@pytest.fixture
def engine(database: tuple[Engine, str]) -> Engine:
    return database[0]


@pytest.fixture
def key() -> MasterKey:
    return MasterKey(generate_master_key(), source="test key")


def known_credentials() -> Credentials:
    return Credentials.of(KNOWN_KEY, KNOWN_SECRET, KNOWN_PASSPHRASE)


def database_text(engine: Engine) -> str:
    """Every row of every table in the public schema, as PostgreSQL renders it as text."""
    parts = []
    with engine.connect() as conn:
        parts.append("\n".join(str(row) for row in conn.execute(text("SELECT * FROM credentials"))))
        tables = conn.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        ).scalars()
        for table in list(tables):
            rows = conn.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()
            parts.extend(rows)
            # bytea columns decoded as UTF-8 text too, in case a value were stored unencrypted as bytes
            columns = conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = :t AND data_type = 'bytea'"
                ),
                {"t": table},
            ).scalars()
            for column in list(columns):
                parts.extend(
                    str(v)
                    for v in conn.execute(
                        text(f'SELECT convert_from("{column}", \'UTF8\') FROM "{table}" WHERE "{column}" IS NOT NULL')
                    ).scalars()
                )
    return "\n".join(parts)


def pg_dump_text(url: str) -> str | None:
    binary = shutil.which("pg_dump")
    if binary is None:
        return None
    plain_url = url.replace("postgresql+psycopg://", "postgresql://")
    result = subprocess.run([binary, "--dbname", plain_url], capture_output=True, text=True, check=False)
    if result.returncode != 0:  # e.g. an older pg_dump than the server
        return None
    return result.stdout


def test_store_round_trip_and_nothing_leaks(
    database: tuple[Engine, str], key: MasterKey, caplog: pytest.LogCaptureFixture
) -> None:
    engine, url = database
    store = DatabaseCredentialStore(engine, key)
    assert isinstance(store, CredentialStore)
    caplog.set_level(logging.DEBUG)
    store.put("main", "binance", known_credentials())
    store.put("okx-sub", "okx", Credentials.of("other-key-000000", "other-secret-000000"))
    got = store.get("main")
    assert got.api_key.get_secret_value() == KNOWN_KEY
    assert got.api_secret.get_secret_value() == KNOWN_SECRET
    assert got.passphrase is not None
    assert got.passphrase.get_secret_value() == KNOWN_PASSPHRASE
    assert store.get("okx-sub").passphrase is None
    for shown in (repr(got), str(got), got.model_dump_json(), str(got.model_dump()), f"{got}"):
        assert_clean(shown)

    infos = store.list()
    assert [i.account for i in infos] == ["main", "okx-sub"]
    assert isinstance(infos[0], CredentialInfo)
    assert infos[0].key_fingerprint == key_fingerprint(KNOWN_KEY)
    assert infos[0].exchange == "binance"
    assert infos[0].created_at.tzinfo is not None
    assert infos[0].rotated_at is None
    assert_clean(repr(infos))

    # Replacing an account's credentials is a rotation of that account.
    store.put("okx-sub", "okx", Credentials.of("other-key-111111", "other-secret-111111", "pp-111111"))
    replaced = {i.account: i for i in store.list()}["okx-sub"]
    assert replaced.rotated_at is not None
    assert replaced.key_fingerprint == key_fingerprint("other-key-111111")

    assert "stored credentials for account main (binance, key" in caplog.text  # the flow did log
    assert_clean(caplog.text)
    assert_clean("\n".join(r.getMessage() for r in caplog.records))
    dump = database_text(engine)
    assert "binance" in dump  # the scan does see the rows
    assert_clean(dump)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT api_secret_ciphertext FROM credentials WHERE account = 'main'")).scalar_one()
    assert bytes(row).startswith(b"gAAAAA")  # a Fernet token
    full_dump = pg_dump_text(url)
    if full_dump is not None:
        assert "CREATE TABLE public.credentials" in full_dump
        assert_clean(full_dump)

    store.remove("okx-sub")
    assert [i.account for i in store.list()] == ["main"]
    with pytest.raises(CredentialsNotFoundError, match="no credentials stored for account okx-sub"):
        store.get("okx-sub")
    with pytest.raises(CredentialsNotFoundError):
        store.remove("okx-sub")


def test_wrong_master_key_fails_clearly(engine: Engine, key: MasterKey) -> None:
    DatabaseCredentialStore(engine, key).put("main", "binance", known_credentials())
    wrong = DatabaseCredentialStore(engine, MasterKey(generate_master_key()))
    with pytest.raises(SecretError, match=r"cannot decrypt the api_key of account main: wrong master key") as info:
        wrong.get("main")
    assert info.value.reason == "secret_undecryptable"
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert_clean("".join(traceback.format_exception(info.value)))
    rendered = "".join(traceback.TracebackException.from_exception(info.value, capture_locals=True).format())
    assert_clean(rendered)
    # list works without decrypting anything
    assert [i.account for i in wrong.list()] == ["main"]


def test_exception_while_holding_credentials_does_not_leak(engine: Engine, key: MasterKey) -> None:
    store = DatabaseCredentialStore(engine, key)
    store.put("main", "binance", known_credentials())

    def use(credentials: Credentials) -> None:
        raise RuntimeError(f"exchange said no to {credentials}")

    try:
        use(store.get("main"))
    except RuntimeError:
        formatted = traceback.format_exc()
        info = sys.exc_info()
    assert "exchange said no" in formatted
    assert_clean(formatted)
    assert info[1] is not None
    assert_clean("".join(traceback.TracebackException.from_exception(info[1], capture_locals=True).format()))


def test_rotate_master_re_encrypts_in_one_transaction(engine: Engine, key: MasterKey) -> None:
    store = DatabaseCredentialStore(engine, key)
    store.put("a", "binance", known_credentials())
    store.put("b", "okx", Credentials.of("key-b-000000", "secret-b-000000", "pass-b-000000"))
    with engine.connect() as conn:
        before = conn.execute(text("SELECT account, api_secret_ciphertext FROM credentials")).all()
    new_text = generate_master_key()
    new = MasterKey(new_text, source="new")

    assert rotate_master_key(engine, key, new) == 2

    with engine.connect() as conn:
        after = conn.execute(text("SELECT account, api_secret_ciphertext, rotated_at FROM credentials")).all()
    assert {a for a, _ in before} == {r[0] for r in after}
    assert all(r[2] is not None for r in after)
    assert not set(bytes(c) for _, c in before) & {bytes(r[1]) for r in after}
    assert DatabaseCredentialStore(engine, new).get("a").api_secret.get_secret_value() == KNOWN_SECRET
    with pytest.raises(SecretError, match="wrong master key"):
        DatabaseCredentialStore(engine, key).get("a")
    with pytest.raises(SecretError, match="same as the current one"):
        rotate_master_key(engine, new, MasterKey(new_text))
    assert_clean(database_text(engine))


def test_rotate_master_failure_midway_changes_nothing(engine: Engine, key: MasterKey) -> None:
    store = DatabaseCredentialStore(engine, key)
    store.put("a", "binance", known_credentials())
    store.put("b", "binance", Credentials.of("key-b-000000", "secret-b-000000"))
    # Row "c" was written under some other key: rotation reaches it after re-encrypting a and b.
    DatabaseCredentialStore(engine, MasterKey(generate_master_key())).put(
        "c", "binance", Credentials.of("key-c-000000", "secret-c-000000")
    )
    with engine.connect() as conn:
        before = conn.execute(text("SELECT * FROM credentials ORDER BY account")).all()
    with pytest.raises(SecretError, match="cannot decrypt the api_key of account c"):
        rotate_master_key(engine, key, MasterKey(generate_master_key()))
    with engine.connect() as conn:
        after = conn.execute(text("SELECT * FROM credentials ORDER BY account")).all()
    assert before == after
    assert store.get("a").api_secret.get_secret_value() == KNOWN_SECRET


# --- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def cli_env(database: tuple[Engine, str]) -> dict[str, str]:
    key_text = generate_master_key()
    return {
        "MELTICA_DATABASE_URL": database[1],
        "MELTICA_MASTER_KEY": key_text,
        "MELTICA_MASTER_KEY_FILE": "",
        "MELTICA_MASTER_KEY_KEYRING": "off",
        "MELTICA_NEW_MASTER_KEY": "",
    }


def test_cli_add_list_rotate_remove(
    database: tuple[Engine, str], cli_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = database
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    outputs = []

    added = runner.invoke(
        app,
        ["keys", "add", "main", "--exchange", "binance"],
        input=f"{KNOWN_KEY}\n{KNOWN_SECRET}\n{KNOWN_PASSPHRASE}\n",
        env=cli_env,
    )
    outputs.append(added.output)
    assert added.exit_code == 0, added.output
    assert key_fingerprint(KNOWN_KEY) in added.stdout

    listed = runner.invoke(app, ["keys", "list"], env={**cli_env, "MELTICA_MASTER_KEY": ""})
    outputs.append(listed.output)
    assert listed.exit_code == 0, listed.output  # listing needs no master key
    assert "main" in listed.stdout
    assert "binance" in listed.stdout
    assert key_fingerprint(KNOWN_KEY) in listed.stdout

    # rotate-master: the new key from a 0600 file
    new_key = generate_master_key()
    new_file = tmp_path / "new.key"
    new_file.write_text(new_key + "\n")
    new_file.chmod(0o644)
    refused = runner.invoke(app, ["keys", "rotate-master", "--new-key-file", str(new_file)], env=cli_env)
    outputs.append(refused.output)
    assert refused.exit_code != 0
    assert "chmod 600" in refused.stderr
    new_file.chmod(0o600)
    rotated = runner.invoke(app, ["keys", "rotate-master", "--new-key-file", str(new_file)], env=cli_env)
    outputs.append(rotated.output)
    assert rotated.exit_code == 0, rotated.output
    assert "re-encrypted 1 credential(s)" in rotated.stdout

    # the old key no longer decrypts; the new one does
    with pytest.raises(SecretError, match="wrong master key"):
        DatabaseCredentialStore(engine, MasterKey(cli_env["MELTICA_MASTER_KEY"])).get("main")
    assert DatabaseCredentialStore(engine, MasterKey(new_key)).get("main").api_key.get_secret_value() == KNOWN_KEY

    # rotating again with the old key fails clearly and changes nothing
    again = runner.invoke(
        app, ["keys", "rotate-master"], env={**cli_env, "MELTICA_NEW_MASTER_KEY": generate_master_key()}
    )
    outputs.append(again.output)
    assert again.exit_code == 1
    assert "wrong master key" in again.stderr
    assert "nothing was changed" in again.stderr
    assert "Traceback" not in again.output

    removed = runner.invoke(app, ["keys", "remove", "main"], env=cli_env)
    outputs.append(removed.output)
    assert removed.exit_code == 0, removed.output
    missing = runner.invoke(app, ["keys", "remove", "main"], env=cli_env)
    assert missing.exit_code == 1
    assert "no credentials stored for account main" in missing.stderr

    for output in outputs:
        assert_clean(output)
    assert_clean(caplog.text)


def test_cli_rejects_missing_input(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["keys", "add", "main", "--exchange", "binance"], input="", env=cli_env)
    assert result.exit_code == 2
    assert "API key and an API secret are required" in result.stderr


def test_cli_subprocess_wrong_key_no_traceback(database: tuple[Engine, str], cli_env: dict[str, str]) -> None:
    """The real `meltica` process: stdin input, then a wrong master key → one clear line, exit 1."""
    env = {**os.environ, **cli_env}
    command = [sys.executable, "-m", "meltica", "keys"]
    added = subprocess.run(
        [*command, "add", "main", "-x", "binance"],
        input=f"{KNOWN_KEY}\n{KNOWN_SECRET}\n",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    assert_clean(added.stdout + added.stderr)
    engine = database[0]
    with pytest.raises(SecretError, match="wrong master key"):
        DatabaseCredentialStore(engine, MasterKey(generate_master_key())).get("main")
    wrong = subprocess.run(
        [*command, "rotate-master"],
        env={**env, "MELTICA_MASTER_KEY": generate_master_key(), "MELTICA_NEW_MASTER_KEY": generate_master_key()},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert wrong.returncode == 1
    assert "cannot decrypt" in wrong.stderr
    assert "wrong master key" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert_clean(wrong.stdout + wrong.stderr)
