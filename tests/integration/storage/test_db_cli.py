"""`meltica db downgrade` and small CLI behaviours as an operator meets them: a real process, a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from meltica.storage import migrate
from tests.integration.conftest import runtime_url_of

pytestmark = pytest.mark.integration


def meltica(engine: Engine, *args: str, env: str = "dev", **extra: str) -> subprocess.CompletedProcess[str]:
    """``meltica ARGS`` as production runs it: runtime commands as the runtime role, `db` as the owner."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("MELTICA_") or k == "MELTICA_STATE_DIR"}
    environ.update(
        MELTICA_DATABASE_URL=runtime_url_of(engine),
        MELTICA_DATABASE_MIGRATION_URL=engine.url.render_as_string(hide_password=False),
        MELTICA_ENV=env,
        COLUMNS="200",
    )
    environ.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "meltica", *args], capture_output=True, text=True, env=environ, timeout=300, check=False
    )


def add_fill(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO fills (exchange, account, trade_id, symbol, side, price, quantity, fee, ts) "
                "VALUES ('binance', 'main', 't1', 'BTC/USDT', 'buy', 42000.5, 0.01, 0, :ts)"
            ),
            {"ts": datetime(2022, 1, 1, tzinfo=UTC)},
        )


def test_downgrade_in_prod_lists_what_it_drops_and_needs_yes_destroy_data(empty_database: Engine) -> None:
    migrate.upgrade(empty_database)
    add_fill(empty_database)
    head = migrate.current_revision(empty_database)

    refused = meltica(empty_database, "db", "downgrade", "base", env="staging")
    assert refused.returncode == 2, refused.stderr
    assert "refusing to downgrade the staging database" in refused.stderr and "--yes-destroy-data" in refused.stderr
    assert f"downgrade {head} → base would remove:" in refused.stdout
    assert "table fills (1 rows) — DROPPED with its data" in refused.stdout
    assert "table kill_switch_state (0 rows)" in refused.stdout
    assert "Traceback" not in refused.stderr
    # nothing was touched: the preview ran in a transaction that was rolled back
    assert migrate.current_revision(empty_database) == head
    with empty_database.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM fills")).scalar_one() == 1

    one_step = meltica(empty_database, "db", "downgrade", "-1", env="prod")
    assert one_step.returncode == 2 and f"revision {head}:" in one_step.stdout
    # one step lists only what the head revision removes (0009: the stored reports), never the older tables
    assert one_step.stdout.count("revision ") == 1
    assert "table fills" not in one_step.stdout and "kill_switch_state" not in one_step.stdout
    assert migrate.current_revision(empty_database) == head

    done = meltica(empty_database, "db", "downgrade", "base", "--yes-destroy-data", env="staging")
    assert done.returncode == 0, done.stderr
    assert "table fills (1 rows) — DROPPED with its data" in done.stdout and "at revision base" in done.stdout
    assert migrate.current_revision(empty_database) is None


def test_downgrade_minus_one_as_the_readme_writes_it_and_log_level_applied(empty_database: Engine) -> None:
    up = meltica(empty_database, "db", "upgrade", MELTICA_LOG_LEVEL="INFO")
    assert up.returncode == 0, up.stderr
    assert "INFO meltica.cli.db_cmd: migrating" in up.stderr  # MELTICA_LOG_LEVEL applied
    head = migrate.current_revision(empty_database)

    down = meltica(empty_database, "db", "downgrade", "-1", MELTICA_LOG_LEVEL="WARNING")
    assert down.returncode == 0, down.stderr
    assert "migrating" not in down.stderr  # below WARNING: not shown
    assert migrate.current_revision(empty_database) not in (head, None)
    assert "at revision" in down.stdout

    # log_level from the environment's file (staging: INFO), no variable set
    up_again = meltica(empty_database, "db", "upgrade", env="staging")
    assert up_again.returncode == 0 and "INFO meltica.cli.db_cmd: migrating" in up_again.stderr


def test_data_show_with_a_bad_time_is_one_line_and_exit_2(empty_database: Engine) -> None:
    shown = meltica(
        empty_database,
        "data",
        "show",
        "--exchange",
        "binance",
        "--symbol",
        "BTC/USDT",
        "--timeframe",
        "1m",
        "--start",
        "yesterday",
        MELTICA_LOG_LEVEL="WARNING",
    )
    assert shown.returncode == 2
    assert shown.stderr.strip() == "error: --start: time is not ISO-8601 or an epoch number: 'yesterday'"
