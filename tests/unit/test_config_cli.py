from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meltica.cli.config_cmd import app

SECRET = "Zq9-very-secret-db-password"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("MELTICA_"):
            monkeypatch.delenv(key)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_show_masks_secrets(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"accounts:\n  - {{name: a, exchange: binance, api_secret: {SECRET}}}\n")
    env = {"MELTICA_DATABASE_URL": f"postgresql://u:{SECRET}@h/db"}
    for fmt in ("yaml", "json"):
        result = runner.invoke(app, ["show", "--config", str(path), "--format", fmt], env=env)
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output
        assert "****" in result.output
    data = json.loads(runner.invoke(app, ["show", "--config", str(path), "--format", "json"], env=env).output)
    assert data["accounts"][0]["api_secret"] == "****"
    assert data["database_url"] == "postgresql://u:****@h/db"


def test_show_packaged_env(runner: CliRunner) -> None:
    result = runner.invoke(app, ["show", "--env", "prod"])
    assert result.exit_code == 0, result.output
    assert "environment: prod" in result.output


def test_validate_ok_and_invalid(runner: CliRunner, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["validate", "--env", "staging"])
    assert ok.exit_code == 0
    assert "ok: staging" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("risk:\n  max_order_notional: lots\n")
    result = runner.invoke(app, ["validate", "--config", str(bad)])
    assert result.exit_code == 2
    assert f"error: {bad}: risk.max_order_notional: 'lots' is not a decimal number" in result.stderr


def test_invalid_env_var_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["show"], env={"MELTICA_TRADING_MODE": "yolo"})
    assert result.exit_code == 2
    assert "error: environment variable MELTICA_TRADING_MODE: trading_mode:" in result.stderr
    assert "yolo" not in result.stderr  # inputs are hidden: they may be secrets


def test_encrypt_command(runner: CliRunner) -> None:
    key = runner.invoke(app, ["generate-key"]).output.strip()
    result = runner.invoke(app, ["encrypt"], input="my-api-secret\n", env={"MELTICA_MASTER_KEY": key})
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert token.startswith("encrypted:")
    from meltica.secrets import resolve_secret

    assert resolve_secret(token, key=key).get_secret_value() == "my-api-secret"
    no_key = runner.invoke(app, ["encrypt"], input="x\n")
    assert no_key.exit_code == 2
    assert "no master key" in no_key.stderr


def test_root_cli_exit_status_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MELTICA_")}
    result = subprocess.run(
        [sys.executable, "-m", "meltica", "config", "validate", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: colour: unknown setting (not part of the schema)"
