"""`meltica keys rotate-master` carries the `encrypted:` tokens of configuration files over to the new master key.

No database here (`--no-database`); tests/integration/test_keys_rotate_database_and_config.py rotates both together.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meltica.cli import app
from meltica.config import load_settings
from meltica.errors import SecretError
from meltica.secrets import MasterKey, encrypt_secret, generate_master_key, resolve_secret

API_KEY = "APIKEY-rotation-known-111"
API_SECRET = "S3CRET-rotation-known-222"
OTHER_SECRET = "S3CRET-other-known-333"
PLAINS = (API_KEY, API_SECRET, OTHER_SECRET)
TOKEN = re.compile(r"encrypted:[A-Za-z0-9_=-]+")

CONFIG = """\
# Paper account whose credentials are encrypted: mentions like encrypted:<token> in comments are not tokens.
environment: paper
trading_mode: paper
symbols: [BTC/USDT]
accounts:
  - name: main
    exchange: binance
    sandbox: true
    api_key: '{api_key}'   # quoted
    api_secret: {api_secret}
risk:
  max_order_notional: 1000   # keep   this spacing
  daily_loss_limit: 500
"""


@pytest.fixture
def keys() -> tuple[str, str]:
    return generate_master_key(), generate_master_key()


def env_for(old: str, new: str) -> dict[str, str]:
    return {
        "MELTICA_MASTER_KEY": old,
        "MELTICA_MASTER_KEY_FILE": "",
        "MELTICA_MASTER_KEY_KEYRING": "off",
        "MELTICA_NEW_MASTER_KEY": new,
        "MELTICA_ENV": "",
    }


def write_config(path: Path, key: str, *, secret_key: str | None = None, newline: str = "\n") -> str:
    text = CONFIG.format(
        api_key=encrypt_secret(API_KEY, key=key),
        api_secret=encrypt_secret(API_SECRET, key=secret_key or key),
    )
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    path.chmod(0o600)
    return path.read_bytes().decode("utf-8")


def rotate(*args: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["keys", "rotate-master", "--no-database", *args], env=env)
    for plain in PLAINS:
        assert plain not in result.output
    return result


def test_tokens_re_encrypted_in_place_and_the_file_loads_under_the_new_key(
    tmp_path: Path, keys: tuple[str, str]
) -> None:
    old, new = keys
    path = tmp_path / "settings.yaml"
    before = write_config(path, old)

    result = rotate("--config", str(path), env=env_for(old, new))

    assert result.exit_code == 0, result.output
    after = path.read_bytes().decode("utf-8")
    # Everything but the tokens is byte for byte the same; every token changed.
    assert TOKEN.split(after) == TOKEN.split(before)
    assert not set(TOKEN.findall(after)) & set(TOKEN.findall(before))
    assert len(TOKEN.findall(after)) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["settings.yaml"]  # no staged file left behind

    settings = load_settings(config_file=path)
    account = settings.accounts[0]
    assert account.api_key is not None
    assert account.api_secret is not None
    assert resolve_secret(account.api_key, key=new).get_secret_value() == API_KEY
    assert resolve_secret(account.api_secret, key=new).get_secret_value() == API_SECRET
    with pytest.raises(SecretError, match="wrong master key"):
        resolve_secret(account.api_secret, key=old)

    assert f"{path}:9: accounts[0].api_key: re-encrypted" in result.stdout
    assert f"{path}:10: accounts[0].api_secret: re-encrypted" in result.stdout
    assert "re-encrypted 2 token(s) in 1 of 1 configuration file(s)" in result.stdout


def test_undecryptable_token_is_reported_by_file_and_line_and_nothing_changes(
    tmp_path: Path, keys: tuple[str, str]
) -> None:
    old, new = keys
    good = tmp_path / "good.yaml"
    good_before = write_config(good, old)
    bad = tmp_path / "bad.yaml"
    bad_before = write_config(bad, old, secret_key=generate_master_key())  # api_secret under a third key

    result = rotate("--config", str(good), "--config", str(bad), env=env_for(old, new))

    assert result.exit_code == 1
    assert f"{bad}:10: accounts[0].api_secret: encrypted token cannot be decrypted" in result.stderr
    assert "1 encrypted token(s) in configuration files cannot be decrypted" in result.stderr
    assert "nothing was changed" in result.stderr
    assert "api_key" not in result.stderr  # the decryptable token of the same file is not a problem
    assert "Traceback" not in result.output
    assert good.read_bytes().decode("utf-8") == good_before
    assert bad.read_bytes().decode("utf-8") == bad_before


def test_dry_run_reports_and_writes_nothing(tmp_path: Path, keys: tuple[str, str]) -> None:
    old, new = keys
    path = tmp_path / "settings.yaml"
    before = write_config(path, old)

    result = rotate("--config", str(path), "--dry-run", env=env_for(old, new))

    assert result.exit_code == 0, result.output
    assert f"{path}:10: accounts[0].api_secret: would re-encrypt" in result.stdout
    assert "would re-encrypt 2 token(s) in 1 of 1 configuration file(s)" in result.stdout
    assert path.read_bytes().decode("utf-8") == before


def test_directory_scan_crlf_and_tokens_already_under_the_new_key(tmp_path: Path, keys: tuple[str, str]) -> None:
    old, new = keys
    nested = tmp_path / "live"
    nested.mkdir()
    crlf = nested / "windows.yml"
    crlf_before = write_config(crlf, old, newline="\r\n")
    rotated = tmp_path / "done.yaml"
    rotated_before = write_config(rotated, new)  # rotated by an earlier run
    (tmp_path / "notes.txt").write_text(f"api_secret: {encrypt_secret(OTHER_SECRET, key=generate_master_key())}\n")

    result = rotate("--config", str(tmp_path), env=env_for(old, new))

    assert result.exit_code == 0, result.output
    crlf_after = crlf.read_bytes().decode("utf-8")
    assert crlf_after.count("\r\n") == crlf_before.count("\r\n") > 10
    assert TOKEN.split(crlf_after) == TOKEN.split(crlf_before)
    assert rotated.read_bytes().decode("utf-8") == rotated_before
    assert f"{rotated}:10: accounts[0].api_secret: already under the new key" in result.stdout
    assert "re-encrypted 2 token(s) in 1 of 2 configuration file(s)" in result.stdout
    account = load_settings(config_file=crlf).accounts[0]
    assert account.api_secret is not None
    assert resolve_secret(account.api_secret, key=new).get_secret_value() == API_SECRET


def test_same_key_and_missing_file_are_refused(tmp_path: Path, keys: tuple[str, str]) -> None:
    old, _ = keys
    path = tmp_path / "settings.yaml"
    before = write_config(path, old)

    same = rotate("--config", str(path), env=env_for(old, old))
    assert same.exit_code == 1
    assert "same as the current one" in same.stderr
    missing = rotate("--config", str(tmp_path / "nope.yaml"), env=env_for(old, generate_master_key()))
    assert missing.exit_code == 2
    assert "no such configuration file" in missing.stderr
    assert path.read_bytes().decode("utf-8") == before


def test_plan_names_fields_in_sequences_and_skips_aliases(tmp_path: Path, keys: tuple[str, str]) -> None:
    from meltica.secrets.config_tokens import config_files, plan_config_rotation

    old, new = keys
    token = encrypt_secret(API_SECRET, key=old)
    path = tmp_path / "anchors.yaml"
    path.write_text(f'first: &secret {token}\nlist:\n  - x\n  - {{password: "{token}"}}\nagain: *secret\n')
    plan = plan_config_rotation(config_files([path, tmp_path]), MasterKey(old), MasterKey(new))
    assert [(s.line, s.field) for s in plan.reencrypted] == [(1, "first"), (4, "list[1].password")]
    assert len(plan.files) == 1  # the file named twice (directly and through its directory) counts once
    rewritten = plan.files[0].rewritten
    data = yaml.safe_load(rewritten)
    assert data["again"] == data["first"]
    assert resolve_secret(data["list"][1]["password"], key=new).get_secret_value() == API_SECRET
    assert rewritten.count("&secret encrypted:") == 1
    assert rewritten.endswith("again: *secret\n")
    assert '{password: "encrypted:' in rewritten


def test_tokens_in_environment_variables_are_named_not_shown(tmp_path: Path, keys: tuple[str, str]) -> None:
    old, new = keys
    path = tmp_path / "settings.yaml"
    write_config(path, old)
    token = encrypt_secret(OTHER_SECRET, key=old)
    env = {**env_for(old, new), "MELTICA_ACCOUNTS__0__API_SECRET": token}

    result = rotate("--config", str(path), "--dry-run", env=env)

    assert result.exit_code == 0, result.output
    assert "environment variable MELTICA_ACCOUNTS__0__API_SECRET holds an encrypted: token" in result.stderr
    assert token not in result.output
