"""Kill-switch scopes and refusals that mutation testing (``make mutation``) found unchecked: an unknown
scope kind, or a scope without a name, is refused (fail closed), not halted on a scope nothing reads; on a
tie of modes the broadest scope is reported; the refusals say what to do instead."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from meltica.errors import InfrastructureUnavailableError
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, KillSwitchMode
from meltica.risk.kill_switch import KillSwitchChange, default_actor, system_clock
from tests.kit import OutageKillSwitchStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def switch() -> KillSwitch:
    return KillSwitch(InMemoryKillSwitchStore(), clock=lambda: T0)


@pytest.mark.parametrize("scope", ["venue:binance", "acount:main", "symbol:BTC/USDT", "account:", "strategy:"])
def test_an_unknown_or_nameless_scope_is_refused(scope: str) -> None:
    ks = switch()
    with pytest.raises(ValueError, match="global, account:<name> or strategy:<name>"):
        ks.engage("halt", "drill", "ops", scope=scope)
    assert ks.active == {}  # nothing engaged on a scope that no order would ever be checked against


def test_on_a_tie_the_broadest_scope_is_reported() -> None:
    ks = switch()
    ks.engage("halt", "account breach", "ops", scope="account:main")
    ks.engage("halt", "desk halt", "ops", scope="global")
    ks.engage("halt", "strategy bug", "ops", scope="strategy:mm")
    assert ks.effective("main", "mm") == (KillSwitchMode.HALT, "global")
    ks.release("ops", "desk back", scope="global")
    assert ks.effective("main", "mm") == (KillSwitchMode.HALT, "account:main")
    ks.engage("reduce_only", "wind down", "ops", scope="global")
    assert ks.effective("main", "mm") == (KillSwitchMode.HALT, "account:main")  # stricter beats broader


def test_refusals_say_what_to_do_instead() -> None:
    ks = switch()
    with pytest.raises(ValueError, match=r"use release\(\)"):
        ks.engage("off", "drill", "ops")
    with pytest.raises(ValueError, match="use off, halt or reduce_only"):
        ks.engage("panic", "drill", "ops")
    with pytest.raises(ValueError, match="needs a reason"):
        ks.engage("halt", "  ", "ops")


def test_changes_made_during_an_outage_hold_and_are_stored_in_order_once_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = OutageKillSwitchStore()
    ks = KillSwitch(store, clock=lambda: T0)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="meltica.risk.kill_switch"):
        ks.engage("reduce_only", "wind down", "ops", scope="account:main", details={"ticket": 7})
        ks.engage("halt", "runaway", "ops", scope="strategy:mm")
        assert ks.effective("main", "mm") == (KillSwitchMode.HALT, "strategy:mm")  # held in memory
        assert [(c.scope, c.current.mode) for c in ks.unsaved] == [
            ("account:main", KillSwitchMode.REDUCE_ONLY),
            ("strategy:mm", KillSwitchMode.HALT),
        ]
        assert ks.retry_unsaved() == 2  # still down: both wait, in order
        assert any(
            r.levelno == logging.CRITICAL and "account:main" in r.getMessage() and "still not stored" in r.getMessage()
            for r in caplog.records
        )
        store.down = False
        assert ks.retry_unsaved() == 0
    assert [(c.scope, c.current.mode) for c in store.changes] == [
        ("account:main", KillSwitchMode.REDUCE_ONLY),
        ("strategy:mm", KillSwitchMode.HALT),
    ]
    assert store.changes[0].details == {"ticket": 7}
    assert any(
        "strategy:mm" in r.getMessage() and "stored after a failed write" in r.getMessage() for r in caplog.records
    )
    ks.release("ops", scope="strategy:mm", details={"ticket": 8})  # stored now, so a release is allowed
    released = store.changes[-1]
    assert (released.current.mode, released.current.reason, released.current.actor) == (
        KillSwitchMode.OFF,
        "released",
        "ops",
    )
    assert released.details == {"ticket": 8}
    assert KillSwitch(store).state_of("strategy:mm").mode is KillSwitchMode.OFF


def test_an_outage_is_said_with_the_scope_the_mode_and_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    """What an operator reads during and after a database outage names the scope, the mode and the cause;
    loosening while a change waits is refused with the reason."""
    store = OutageKillSwitchStore()
    ks = KillSwitch(store, clock=lambda: T0)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="meltica.risk.kill_switch"):
        ks.engage("reduce_only", "wind down", "ops", scope="account:main")
        ks.engage("halt", "runaway", "ops", scope="account:main")
        with pytest.raises(InfrastructureUnavailableError) as refused:
            ks.release("ops", scope="account:main")
        store.down = False
        assert ks.retry_unsaved() == 0
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("ERROR", "kill switch account:main: reduce_only could NOT be stored; it holds in this process and the "
                  "write is retried"),
        ("WARNING", "kill switch account:main: off → reduce_only (wind down, by ops)"),
        ("CRITICAL", "kill switch account:main: reduce_only still not stored (database unavailable): holding it, "
                     "retrying"),
        ("ERROR", "kill switch account:main: halt holds in this process; stored after the earlier changes"),
        ("WARNING", "kill switch account:main: reduce_only → halt (runaway, by ops)"),
        ("CRITICAL", "kill switch account:main: reduce_only still not stored (database unavailable): holding it, "
                     "retrying"),
        ("WARNING", "kill switch account:main: reduce_only stored after a failed write"),
        ("WARNING", "kill switch account:main: halt stored after a failed write"),
    ]  # fmt: skip
    assert str(refused.value) == (
        "kill switch account:main: earlier changes are not stored yet; refusing to loosen it to off"
    )
    assert ks.state_of("account:main").mode is KillSwitchMode.HALT


def test_a_failing_listener_does_not_keep_the_change_from_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raises is said loudly and raised to the caller, after every other listener heard the
    change; the change stands (fail closed: a halt is not undone by a listener's bug)."""
    ks = switch()
    heard: list[tuple[str, KillSwitchMode]] = []

    def broken(change: KillSwitchChange) -> None:
        raise RuntimeError("listener bug")

    ks.subscribe(broken)
    ks.subscribe(lambda change: heard.append((change.scope, change.current.mode)))
    with caplog.at_level(logging.CRITICAL, logger="meltica.risk.kill_switch"), pytest.raises(RuntimeError):
        ks.engage("halt", "runaway", "ops", scope="account:main")
    assert heard == [("account:main", KillSwitchMode.HALT)]
    assert ks.state_of("account:main").mode is KillSwitchMode.HALT
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == f"kill-switch listener {broken!r} failed on account:main → halt"


def test_a_change_is_stamped_by_the_switch_clock_and_the_system_clock_is_utc() -> None:
    ks = switch()
    assert ks.engage("halt", "runaway", "ops", scope="global").since == T0
    now = system_clock()
    assert now.tzinfo is UTC
    with pytest.raises(ValueError, match=r"^a kill-switch change needs a reason$"):
        ks.engage("reduce_only", " ", "ops", scope="global")


def test_refresh_takes_what_another_process_stored_and_tells_the_listeners() -> None:
    """``meltica kill`` in another process writes the store; a running switch's refresh takes it, tells its
    listeners only of scopes whose mode changed, and keeps its own change that is not stored yet."""
    store = OutageKillSwitchStore()
    running, other = KillSwitch(store, clock=lambda: T0), KillSwitch(store, clock=lambda: T0)
    heard: list[tuple[str, KillSwitchMode, KillSwitchMode, object]] = []
    running.subscribe(lambda c: heard.append((c.scope, c.previous.mode, c.current.mode, c.details.get("source"))))
    other.engage("halt", "exchange incident", "ops", scope="account:main")
    other.engage("reduce_only", "wind down", "ops", scope="strategy:mm")
    changes = running.refresh()
    assert [(c.scope, c.current.mode) for c in changes] == [
        ("account:main", KillSwitchMode.HALT),
        ("strategy:mm", KillSwitchMode.REDUCE_ONLY),
    ]
    assert heard == [
        ("account:main", KillSwitchMode.OFF, KillSwitchMode.HALT, "refresh"),
        ("strategy:mm", KillSwitchMode.OFF, KillSwitchMode.REDUCE_ONLY, "refresh"),
    ]
    assert running.state_of("account:main").reason == "exchange incident"
    assert running.refresh() == []  # nothing changed since: nobody is told again
    assert len(heard) == 2

    store.down = True
    running.engage("halt", "runaway", "risk", scope="strategy:mm")  # held here, not stored
    assert store.states["strategy:mm"].mode is KillSwitchMode.REDUCE_ONLY
    assert running.refresh() == []  # the store's older reduce_only does not undo the halt held here
    assert running.state_of("strategy:mm").mode is KillSwitchMode.HALT
    assert len(running.unsaved) == 1
    store.down = False
    assert running.refresh() == []  # its retry stores the halt first
    assert (running.unsaved, store.states["strategy:mm"].mode) == ([], KillSwitchMode.HALT)


def test_a_change_without_an_actor_names_the_os_user() -> None:
    ks = switch()
    actor = ks.engage("halt", "runaway", None, scope="global").actor
    assert actor and actor == default_actor()


def test_an_unsubscribed_listener_hears_nothing_more() -> None:
    ks = switch()
    heard: list[str] = []
    unsubscribe = ks.subscribe(lambda c: heard.append(c.scope))
    ks.engage("halt", "runaway", "ops", scope="account:main")
    unsubscribe()
    unsubscribe()  # twice is harmless
    ks.engage("halt", "runaway", "ops", scope="account:other")
    assert heard == ["account:main"]


def test_engage_refuses_off_and_says_to_release() -> None:
    with pytest.raises(ValueError, match=r"^engage\(\) takes halt or reduce_only; use release\(\) to turn"):
        switch().engage("off", "done", "ops")


def test_without_a_passwd_entry_the_default_actor_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 1000")  # what a container without /etc/passwd gives

    monkeypatch.setattr("getpass.getuser", no_user)
    assert default_actor() == "unknown"
