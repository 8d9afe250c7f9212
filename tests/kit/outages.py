"""The risk path's stores with a database outage: their writes raise ``ConnectionError`` while ``down``."""

from __future__ import annotations

from meltica.risk import Breach, InMemoryKillSwitchStore, InMemoryRecorder
from meltica.risk.kill_switch import KillSwitchChange


class OutageKillSwitchStore(InMemoryKillSwitchStore):
    """The in-memory kill-switch store; ``save`` raises while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def save(self, change: KillSwitchChange) -> None:
        if self.down:
            raise ConnectionError("database unavailable")
        super().save(change)


class OutageRecorder(InMemoryRecorder):
    """The in-memory risk recorder; ``record_breach`` raises while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def record_breach(self, breach: Breach) -> None:
        if self.down:
            raise ConnectionError("database unavailable")
        super().record_breach(breach)
