"""Kill-switch scopes and refusals that mutation testing (``make mutation``) found unchecked: an unknown
scope kind, or a scope without a name, is refused (fail closed), not halted on a scope nothing reads; on a
tie of modes the broadest scope is reported; the refusals say what to do instead."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meltica.risk import InMemoryKillSwitchStore, KillSwitch, KillSwitchMode

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
