"""The supervisor's children get only the variables they need: what the settings file references as
``env:NAME``, Meltica's and the interpreter's own, and the master key only when the deployment decrypts
something; other exchanges' keys and cloud credentials stay with the supervisor. A stand-in child prints
the environment it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meltica.config import load_settings
from meltica.live.supervisor import child_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "live_standin_child.py")
DRIVER = str(HERE / "live_supervisor_driver.py")

SUPERVISOR_ENV = {
    "MELTICA_MASTER_KEY": "master-key-value-not-for-children",
    "MELTICA_NEW_MASTER_KEY": "new-master-key-value-not-for-children",
    "OTHER_VENUE_API_SECRET": "another-deployments-secret",
    "AWS_SECRET_ACCESS_KEY": "cloud-credential",
    "DEPLOY_API_KEY": "deploy-key-value",
    "DEPLOY_API_SECRET": "deploy-secret-value",
    "DEPLOY_DB_URL": "postgresql+psycopg://u:pw@127.0.0.1:5432/db",
    "MELTICA_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
    "PGSSLMODE": "prefer",
    "PYTHONPATH": "/somewhere",
    "LC_ALL": "C.UTF-8",
}


def settings_file(path: Path, credentials: str) -> Path:
    path.write_text(
        "environment: dev\n"
        "database_url: env:DEPLOY_DB_URL\n"
        "accounts:\n"
        "  - name: venue\n"
        "    exchange: binance\n" + credentials
    )
    return path


REFERENCED = "    api_key: env:DEPLOY_API_KEY\n    api_secret: env:DEPLOY_API_SECRET\n"


@pytest.fixture
def supervisor_env() -> dict[str, str]:
    return {**os.environ, **SUPERVISOR_ENV}


def test_child_gets_referenced_and_infrastructure_variables_but_no_other_secret(
    tmp_path: Path, supervisor_env: dict[str, str]
) -> None:
    settings = settings_file(tmp_path / "live.yaml", REFERENCED)
    spec = {
        "state_dir": str(tmp_path / "live"),
        "children": [{"name": "env", "argv": [sys.executable, CHILD, "print-env", "env"]}],
        "settings": str(settings),
    }
    proc = subprocess.Popen(
        [sys.executable, DRIVER, json.dumps(spec)], env=supervisor_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = tmp_path / "live" / "logs" / "env.log"
    try:
        deadline = time.monotonic() + 30
        line = None
        while line is None and time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            line = next((x for x in text.splitlines() if x.startswith("ENV ")), None)
            if line is None:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
        assert line is not None, "the child never printed its environment"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    env = json.loads(line[4:])
    for name in ("DEPLOY_API_KEY", "DEPLOY_API_SECRET", "DEPLOY_DB_URL", "MELTICA_KAFKA_BOOTSTRAP", "PGSSLMODE"):
        assert env.get(name) == SUPERVISOR_ENV[name], name
    assert env["PYTHONPATH"] == "/somewhere"
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["PATH"] == supervisor_env["PATH"]
    for name in ("MELTICA_MASTER_KEY", "MELTICA_NEW_MASTER_KEY", "OTHER_VENUE_API_SECRET", "AWS_SECRET_ACCESS_KEY"):
        assert name not in env, name


@pytest.mark.parametrize(
    "credentials",
    ["", "    api_key: encrypted:gAAAAA-token\n    api_secret: encrypted:gAAAAA-token\n"],
    ids=["credentials-from-the-store", "encrypted-references"],
)
def test_master_key_is_passed_only_when_the_deployment_decrypts(
    tmp_path: Path, supervisor_env: dict[str, str], credentials: str
) -> None:
    path = settings_file(tmp_path / "live.yaml", credentials)
    settings = load_settings(config_file=path)
    env = child_environment(settings, path, supervisor_env)
    assert env["MELTICA_MASTER_KEY"] == SUPERVISOR_ENV["MELTICA_MASTER_KEY"]
    assert "MELTICA_NEW_MASTER_KEY" not in env
    assert "OTHER_VENUE_API_SECRET" not in env
    plain = settings_file(tmp_path / "plain.yaml", REFERENCED)
    assert "MELTICA_MASTER_KEY" not in child_environment(load_settings(config_file=plain), plain, supervisor_env)
