"""The kill switch on a real PostgreSQL: survives a restart; `meltica kill` as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import Engine, text

from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def database(module_runtime_database: Engine) -> Engine:
    """A fresh database migrated to head, shared by this module's tests, as the runtime role (the rights the
    application has in production; tests/integration/conftest.py)."""
    return module_runtime_database


def events(engine: Engine, scope: str) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM risk_events WHERE details->>'scope' = :scope ORDER BY ts, decision"), {"scope": scope}
        )
        return [dict(row._mapping) for row in rows]


def test_state_survives_a_restart_and_every_change_is_an_event(database: Engine) -> None:
    heard: list[str] = []
    switch = KillSwitch(KillSwitchStore(database))
    switch.subscribe(lambda change: heard.append(f"{change.scope}:{change.current.mode}"))
    switch.engage("halt", "exchange incident", "alice", scope="account:main")
    assert heard == ["account:main:halt"]

    restarted = KillSwitch(KillSwitchStore(database))
    state = restarted.state_of("account:main")
    assert (state.mode, state.reason, state.actor) == (KillSwitchMode.HALT, "exchange incident", "alice")
    assert restarted.effective("main", "mm") == (KillSwitchMode.HALT, "account:main")

    restarted.release("bob", "incident over", scope="account:main")
    assert KillSwitch(KillSwitchStore(database)).state_of("account:main").mode is KillSwitchMode.OFF
    rows = events(database, "account:main")
    assert [(r["decision"], r["actor"], r["reason"], r["account"]) for r in rows] == [
        ("kill_switch_on", "alice", "exchange incident", "main"),
        ("kill_switch_off", "bob", "incident over", "main"),
    ]
    assert rows[1]["details"]["previous_mode"] == "halt"  # type: ignore[index]

    # refresh() picks up a change made by another process and tells the listeners
    KillSwitch(KillSwitchStore(database)).engage("reduce_only", "from elsewhere", "carol", scope="strategy:s1")
    changes = switch.refresh()
    assert [(c.scope, c.current.mode) for c in changes] == [
        ("account:main", KillSwitchMode.OFF),
        ("strategy:s1", KillSwitchMode.REDUCE_ONLY),
    ] or [(c.scope, c.current.mode) for c in changes] == [
        ("strategy:s1", KillSwitchMode.REDUCE_ONLY),
        ("account:main", KillSwitchMode.OFF),
    ]


def meltica(engine: Engine, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MELTICA_DATABASE_URL": engine.url.render_as_string(hide_password=False), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "meltica", "kill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_meltica_kill_on_status_off(database: Engine) -> None:
    on = meltica(database, "on", "--mode", "reduce-only", "--reason", "fat finger seen", "--actor", "ops-1")
    assert on.returncode == 0, on.stderr
    assert "global: off → reduce_only by ops-1: fat finger seen" in on.stdout

    status = meltica(database, "status")
    assert status.returncode == 0, status.stderr
    assert "kill switch global: reduce_only" in status.stdout and "ops-1" in status.stdout

    off = meltica(database, "off", "--reason", "checked")  # actor: the OS user
    assert off.returncode == 0, off.stderr
    assert "global: reduce_only → off" in off.stdout

    rows = events(database, "global")
    assert [(r["decision"], r["reason"]) for r in rows] == [
        ("kill_switch_on", "fat finger seen"),
        ("kill_switch_off", "checked"),
    ]
    assert rows[0]["actor"] == "ops-1" and rows[1]["actor"]
    assert KillSwitch(KillSwitchStore(database)).state.mode is KillSwitchMode.OFF

    bad = meltica(database, "on", "--mode", "sideways", "--reason", "x")
    assert bad.returncode == 2 and "unknown kill-switch mode" in bad.stderr
    missing = meltica(database, "off")
    assert missing.returncode != 0  # --reason is required
