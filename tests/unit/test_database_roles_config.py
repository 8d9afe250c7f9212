"""Settings of the two database roles: which URL `meltica db` uses, what the live processes never get."""

from __future__ import annotations

from pathlib import Path

import pytest

from meltica.config.loader import masked_settings
from meltica.config.settings import MelticaSettings
from meltica.errors import ConfigurationError
from meltica.infra.postgres import migration_database_url
from meltica.live.supervisor import child_environment

RUNTIME = "postgresql+psycopg://meltica_app:runtime-pw@db.example:5432/meltica"
OWNER = "postgresql+psycopg://meltica:owner-pw@db.example:5432/meltica"


@pytest.fixture(autouse=True)
def _no_database_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MELTICA_DATABASE_URL", "MELTICA_DATABASE_MIGRATION_URL", "MELTICA_DATABASE_RUNTIME_ROLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MELTICA_ENVIRONMENT", raising=False)


def settings(**values: object) -> MelticaSettings:
    return MelticaSettings(**values)  # type: ignore[arg-type]


def test_the_migration_url_falls_back_to_the_runtime_url_in_dev_and_paper_only() -> None:
    assert migration_database_url(settings(environment="dev", database_url=RUNTIME)) == RUNTIME
    assert migration_database_url(settings(environment="paper", database_url=RUNTIME)) == RUNTIME
    for environment in ("staging", "prod"):
        with pytest.raises(ConfigurationError, match="database_migration_url") as err:
            migration_database_url(settings(environment=environment, database_url=RUNTIME))
        assert "runtime-pw" not in str(err.value)
        configured = settings(environment=environment, database_url=RUNTIME, database_migration_url=OWNER)
        assert migration_database_url(configured) == OWNER


def test_the_runtime_role_is_a_plain_role_name_and_the_owner_url_is_masked() -> None:
    assert settings().database_runtime_role == "meltica_app"
    assert settings(database_runtime_role="trader_rt").database_runtime_role == "trader_rt"
    for bad in ('app"; DROP TABLE fills; --', "App", "", "1app"):
        with pytest.raises(ValueError, match="role name"):
            settings(database_runtime_role=bad)
    shown = masked_settings(settings(database_url=RUNTIME, database_migration_url=OWNER))
    assert "owner-pw" not in str(shown) and "runtime-pw" not in str(shown)
    assert shown["database_migration_url"] == "postgresql+psycopg://meltica:****@db.example:5432/meltica"


def test_live_processes_never_get_the_owner_url(tmp_path: Path) -> None:
    config = tmp_path / "live.yaml"
    config.write_text("database_url: env:DEPLOY_DB_URL\ndatabase_migration_url: env:DEPLOY_OWNER_URL\n")
    deployment = settings(database_url="env:DEPLOY_DB_URL", database_migration_url="env:DEPLOY_OWNER_URL")
    environ = {
        "PATH": "/usr/bin",
        "DEPLOY_DB_URL": RUNTIME,
        "DEPLOY_OWNER_URL": OWNER,
        "MELTICA_DATABASE_MIGRATION_URL": OWNER,
        "MELTICA_DATABASE_URL": RUNTIME,
    }
    env = child_environment(deployment, config, environ)
    assert env["DEPLOY_DB_URL"] == env["MELTICA_DATABASE_URL"] == RUNTIME
    assert "DEPLOY_OWNER_URL" not in env and "MELTICA_DATABASE_MIGRATION_URL" not in env
